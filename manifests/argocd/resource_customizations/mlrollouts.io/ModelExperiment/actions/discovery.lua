-- Which actions Argo CD offers on a ModelExperiment, by phase.
local actions = {}
local phase = "Pending"
if obj.status ~= nil and obj.status.phase ~= nil then
  phase = obj.status.phase
end
local paused_by_spec = obj.spec ~= nil and obj.spec.paused == true
local finished = phase == "Concluded" or phase == "RolledBack" or phase == "Aborted"
-- abort: all traffic back to the control.
actions["abort"] = {["disabled"] = finished}
-- resume: continue after a sample-ratio-mismatch pause. spec.paused is Git's to clear.
actions["resume"] = {["disabled"] = not (phase == "Paused" and not paused_by_spec)}
-- retry: restart a finished experiment (new samples, same revision).
actions["retry"] = {["disabled"] = not finished}
return actions
