-- Argo CD health of a ModelRollout (mlrollouts.io/v1alpha1).
-- Runs in Argo CD's gopher-lua with only the base, table and package libraries (no string library).
-- Progressing until the operator has observed the current generation. A finished rollout keeps its
-- outcome whatever happens after it: Healthy when promoted (or idle), Degraded when rolled back or
-- aborted. Before that, Degraded for every state that waits for a human: an invalid spec
-- (Valid=False), a hold past progressDeadline or an inconclusive comparison held by policy
-- (Progressing=False), an error limit held (Healthy=False), and a decision the operator failed to
-- apply 3 times in a row (ReconcileError=True), each with its reason. Suspended while paused (a
-- manual gate, spec.paused) or held by a closed gate; Progressing otherwise, the bake and holdout
-- after reaching 100% (phase Baking) included: a baking rollout can still roll back.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
-- Consecutive failed applies after which a reconcile error is persistent (the alert's threshold).
local PERSISTENT_RECONCILE_ERRORS = 3

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the rollout"
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

local finished = phase == "Promoted" or phase == "Idle" or phase == "RolledBack" or phase == "Aborted"

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

if phase == "Promoted" or phase == "Idle" then
  hs.status = "Healthy"
  hs.message = message
elseif phase == "RolledBack" or phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Invalid" or (valid ~= nil and valid.status == "False") then
  hs.status = "Degraded"
  hs.message = (valid ~= nil and valid.message) or message
elseif healthy ~= nil and healthy.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(healthy)
elseif progressing ~= nil and progressing.status == "False" and progressing.reason == "GateClosed" then
  hs.status = "Suspended"
  hs.message = explain(progressing)
elseif progressing ~= nil and progressing.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(progressing)
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
