-- Argo CD action "promote-full": skips the remaining steps, analysis and gates and sends all traffic
-- to the candidate, through the mlrollouts.io/promote-full annotation ("promote" only moves past the
-- current step). The value is a fresh token (the time); the operator acts once per new value.
-- Never touches spec (Git owns it).
local os = require("os")
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["mlrollouts.io/promote-full"] = os.date("!%Y-%m-%dT%XZ")
return obj
