-- Argo CD health of a ModelExperiment (mlrollouts.io/v1alpha1).
-- Progressing until the operator has observed the current generation and while it runs;
-- Suspended while paused; Degraded when rolled back, aborted or invalid; Healthy when concluded.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the experiment"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local valid = nil
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Valid" then
      valid = c
    end
  end
end

local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end

if phase == "Invalid" or (valid ~= nil and valid.status == "False") then
  hs.status = "Degraded"
  hs.message = (valid ~= nil and valid.message) or message
elseif phase == "RolledBack" or phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Concluded" then
  hs.status = "Healthy"
  hs.message = message
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = message
else
  -- Pending, Running, or a phase newer than this script.
  hs.status = "Progressing"
  hs.message = message
end
return hs
