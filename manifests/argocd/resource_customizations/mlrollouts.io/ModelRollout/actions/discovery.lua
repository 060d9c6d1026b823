-- Which actions Argo CD offers on a ModelRollout, by phase.
local actions = {}
local phase = "Pending"
if obj.status ~= nil and obj.status.phase ~= nil then
  phase = obj.status.phase
end
local paused_by_spec = obj.spec ~= nil and obj.spec.paused == true
local finished = phase == "Promoted" or phase == "RolledBack" or phase == "Aborted" or phase == "Idle"
-- promote: move past the current pause or analysis step (analysis and guardrails still apply after
-- it); promote-full: skip the remaining steps, analysis and gates to 100%; abort: all traffic back
-- to stable.
-- In the bake after reaching 100% (phase Baking) there is no step left to promote past; promote-full
-- ends the bake.
actions["promote"] = {["disabled"] = finished or phase == "Invalid" or phase == "Baking"}
actions["promote-full"] = {["disabled"] = finished or phase == "Invalid"}
actions["abort"] = {["disabled"] = finished}
-- resume: release a manual gate (a pause step without duration). spec.paused is Git's to clear.
actions["resume"] = {["disabled"] = not (phase == "Paused" and not paused_by_spec)}
-- retry: restart a rolled-back or aborted revision from weight 0.
actions["retry"] = {["disabled"] = not (phase == "RolledBack" or phase == "Aborted")}
return actions
