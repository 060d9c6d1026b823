-- Argo CD action "promote": moves the rollout past its current pause or analysis step, through the
-- mlrollouts.io/promote annotation. Analysis, guardrails and gates still apply to the steps after it
-- ("promote-full" skips to 100% instead). The value is a fresh token (the time); the operator acts
-- once per new value and records it in status.handled, so repeating the action repeats the request.
-- Never touches spec (Git owns it).
local os = require("os")
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["mlrollouts.io/promote"] = os.date("!%Y-%m-%dT%XZ")
return obj
