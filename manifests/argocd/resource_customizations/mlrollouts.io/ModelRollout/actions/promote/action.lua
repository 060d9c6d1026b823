-- Argo CD action "promote": asks the operator through the mlrollouts.io/promote annotation. The value is
-- a fresh token (the time); the operator acts once per new value and records it in
-- status.handled, so repeating the action repeats the request. Never touches spec (Git owns it).
local os = require("os")
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["mlrollouts.io/promote"] = os.date("!%Y-%m-%dT%XZ")
return obj
