-- Argo CD health of a ModelExperiment (mlrollouts.io/v1alpha1).
-- Runs in Argo CD's gopher-lua with only the base, table and package libraries (no string library).
-- Progressing until the operator has observed the current generation. A finished experiment keeps
-- its outcome whatever happens after it (a later invalid spec included): Healthy when concluded
-- (Concluded=True), Degraded when rolled back or aborted. Before that, Degraded for every state that waits for a
-- human: an invalid spec (Valid=False), an error limit held or a failing control kept
-- (Healthy=False), a hold that stopped progress (Progressing=False), and a decision the operator
-- failed to apply 3 times in a row (ReconcileError=True), each with its reason. Suspended while
-- paused (spec.paused, or a sample-ratio mismatch waiting for a resume); Progressing otherwise.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
-- Consecutive failed applies after which a reconcile error is persistent (the alert's threshold).
local PERSISTENT_RECONCILE_ERRORS = 3

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the experiment"
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

local function explain(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end
local valid = condition("Valid")
local progressing = condition("Progressing")
local healthy = condition("Healthy")
local reconcile = condition("ReconcileError")
-- Concluded=True: the experiment reached its decision. It stays so when the spec is edited into an
-- invalid one afterwards (phase Invalid or Valid=False): traffic is left as the decision set it.
local concluded = condition("Concluded")
local decided = phase == "Concluded" or (concluded ~= nil and concluded.status == "True")

local finished = decided or phase == "RolledBack" or phase == "Aborted"

-- A decision the operator failed to apply again and again: it may never have observed this
-- generation (its first route write was refused), so this comes before the generation check.
if not finished and reconcile ~= nil and reconcile.status == "True"
    and (status.reconcileErrors or 0) >= PERSISTENT_RECONCILE_ERRORS then
  hs.status = "Degraded"
  hs.message = "ReconcileError " .. explain(reconcile)
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if decided then
  hs.status = "Healthy"
  hs.message = message
  if phase ~= "Concluded" and concluded ~= nil and concluded.message ~= nil then
    hs.message = concluded.message
  end
  if valid ~= nil and valid.status == "False" then
    hs.message = hs.message .. " (concluded; the spec is invalid since: " .. (valid.message or "") .. ")"
  end
elseif phase == "RolledBack" or phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Invalid" or (valid ~= nil and valid.status == "False") then
  hs.status = "Degraded"
  hs.message = (valid ~= nil and valid.message) or message
elseif healthy ~= nil and healthy.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(healthy)
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = message
elseif progressing ~= nil and progressing.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(progressing)
else
  -- Pending, Running, or a phase newer than this script.
  hs.status = "Progressing"
  hs.message = message
end
return hs
