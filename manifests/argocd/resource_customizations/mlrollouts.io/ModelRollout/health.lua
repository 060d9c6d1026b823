-- Argo CD health of a ModelRollout (mlrollouts.io/v1alpha1).
-- Progressing until the operator has observed the current generation; Suspended while paused
-- (spec.paused or a manual gate waiting for a resume); Degraded when rolled back, aborted or
-- invalid; Healthy when promoted (or idle: nothing to roll out).
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the rollout"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local function condition(ctype)
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type == ctype then
        return c
      end
    end
  end
  return nil
end

local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end
local valid = condition("Valid")

if phase == "Invalid" or (valid ~= nil and valid.status == "False") then
  hs.status = "Degraded"
  hs.message = (valid ~= nil and valid.message) or message
elseif phase == "RolledBack" or phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Promoted" or phase == "Idle" then
  hs.status = "Healthy"
  hs.message = message
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = message
else
  -- Pending, Progressing, or a phase newer than this script.
  hs.status = "Progressing"
  if status.weight ~= nil then
    hs.message = message .. " (candidate weight " .. tostring(status.weight) .. "%)"
  else
    hs.message = message
  end
end
return hs
