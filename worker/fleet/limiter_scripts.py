"""The rate limiter's state in Redis and the Lua scripts that keep it: GCRA slots, the pace
learned from 429s, slow start, pauses (worker.fleet.limiter calls them)."""

from __future__ import annotations

from typing import Literal

# A deployment idle this long forgets its state (learned limits included).
STATE_TTL_S = 3600.0
# Token counts are estimates until a call's usage is known: slots reserved far ahead keep
# their estimated size (a refund cannot move them), so over-estimates would space calls too
# widely and refunds would overlap them. Under a token limit, slots are reserved at most this
# far ahead (measured: goodput 0.78 and 5 % 429s with 60 s, 0.99 and none with 3 s).
TOKEN_MAX_AHEAD_S = 5.0

# The fleet's *pace* (requests a minute, below any limit declared or stated in headers) is
# learned from 429s, as TCP's congestion window is from losses (CUBIC's curve, in rate):
# - a 429 for a call granted after the last backoff lowers the pace to BACKOFF_FACTOR of the
#   pace (EDGE_BACKOFF_FACTOR at the limit), or of the rate the provider admitted over the
#   last second when that is lower and counted from calls sent at the pace (with no limit
#   known and no pace, of the rate admitted or sent): 429s for calls granted before it
#   answer the old pace and do not back off again; the slots already reserved stretch to
#   the new pace (and move past a Retry-After's pause), and no burst is allowed from then on;
# - while the fleet uses its pace (calls wait for slots), the pace climbs back along a cubic
#   curve: back to the rate it backed off from in RECOVERY_S of use (less after a gentle
#   first backoff at the limit), flat around it, then faster and faster beyond it (a
#   provider that lets load rise slowly, a limit raised), until it meets the declared or
#   stated limit;
# - a deployment with no limit known starts at PROMPTQ_LIMITER_START_RPM and grows
#   SLOW_START_GROWTH times a second of use (slow start) until a 429, a limit known, or
#   MAX_PACE_RPM.
BACKOFF_FACTOR = 0.85
# The first 429 while the fleet runs at its limit (no pace in use) backs off gently: a limit
# enforced over short spells draws one now and then at the edge, and a pace 0.85 of it would
# cost that much goodput until it climbed back. 429s that go on bring BACKOFF_FACTOR.
EDGE_BACKOFF_FACTOR = 0.95
RECOVERY_S = 5.0
SLOW_START_GROWTH = 4.0
MAX_PACE_RPM = 10_000_000.0
# The admitted rate is read from at least this many answers in the last second; with fewer,
# from the calls sent over the last minute, and with fewer than BACKOFF_MIN_CALLS of those,
# not at all: the Retry-After pause alone answers such a 429.
RATE_MIN_ANSWERS = 5
BACKOFF_MIN_CALLS = 10
# Without the grant time of the call a 429 answers, 429s this soon after a backoff are taken
# as answers to calls sent before it.
BACKOFF_SETTLE_S = 2.0
# Slots reserved ahead move when a 429 pauses the fleet or lowers its pace (the schedule
# shifts past the pause and stretches to the new pace: nothing leaves at once when a pause
# ends, and no slot is left empty); a call whose slot was granted before such moves applies
# the last MAX_MOVES of them at departure.
MAX_MOVES = 8

Outcome = Literal["ok", "rate_limited", "error"]

# The state of one deployment is a Redis hash (all times in microseconds of Redis server time):
#   rpm_cfg tpm_cfg          the limits the workers are configured with (0: none)
#   rpm_learned tpm_learned  limits stated in the provider's headers (0: none)
#   pace pace_phase          the pace learned from 429s ("probe") or slow start ("start"); a
#                            phase "done" has no pace (0): it reached the limits
#   pace_max pace_base       the rate the pace backed off from; slow start's first pace
#   pace_k                   the seconds of use the curve takes back to pace_max
#   grow_s grow_at           seconds the pace has been in use since its phase began, and
#                            when they were last counted
#   last_backoff created     when the pace was last lowered (once it has been, no burst is
#                            allowed); when this state was created
#   moves                    the last moves of the reserved slots, "at,to,q;...": slots
#                            from `at` on moved to start at `to`, spaced q times wider
#   r_tat t_tat              GCRA theoretical arrival times for requests and tokens
#   pause_until              no call starts before this (a Retry-After, shared by the fleet)
#   minute req tok r429 (and prev_*): this and the previous minute's counts, for status
#   sec ok1 prev_ok1         answers this and the previous second: the rate admitted
#   busy_since answer_lag    since when calls have waited for the pace's slots; how long an
#                            answer takes after its grant (a moving average)
#   model base               what the deployment is, for status (never the key)
# (worker.fleet.limiter_status reads it for `promptq status`.)
_PRELUDE = (
    f"""
local BACKOFF_FACTOR = {BACKOFF_FACTOR!r}
local EDGE_BACKOFF_FACTOR = {EDGE_BACKOFF_FACTOR!r}
local CUBIC_C = {(1 - BACKOFF_FACTOR) / RECOVERY_S**3!r}
local RECOVERY_S = {RECOVERY_S!r}
local SLOW_START_GROWTH = {SLOW_START_GROWTH!r}
local MAX_PACE_RPM = {MAX_PACE_RPM!r}
local RATE_MIN_ANSWERS = {RATE_MIN_ANSWERS!r}
local BACKOFF_MIN_CALLS = {BACKOFF_MIN_CALLS!r}
local BACKOFF_SETTLE_US = {int(BACKOFF_SETTLE_S * 1_000_000)!r}
local MAX_MOVES = {MAX_MOVES!r}
"""
    + """
local function num(v) return tonumber(v) or 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local flat = redis.call('HGETALL', KEYS[1])
local h = {}
for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
if h.created == nil then h.created = now end
local minute = math.floor(now / 60000000)
if num(h.minute) ~= minute then
  if num(h.minute) == minute - 1 then
    h.prev_req, h.prev_tok, h.prev_r429 = num(h.req), num(h.tok), num(h.r429)
  else
    h.prev_req, h.prev_tok, h.prev_r429 = 0, 0, 0
  end
  h.minute, h.req, h.tok, h.r429 = minute, 0, 0, 0
end
local second = math.floor(now / 1000000)
if num(h.sec) ~= second then
  h.prev_ok1 = (num(h.sec) == second - 1) and num(h.ok1) or 0
  h.sec, h.ok1 = second, 0
end
if h.rpm_source == '429' then
  -- A state kept by an earlier version: its rate learned from 429s becomes the pace.
  h.pace, h.pace_max, h.pace_phase = num(h.rpm_learned), num(h.rpm_learned), 'probe'
  h.grow_s, h.grow_at, h.rpm_learned, h.rpm_source = RECOVERY_S, now, 0, ''
  h.last_backoff = now
end
local function limit(configured, learned)
  configured, learned = num(configured), num(learned)
  if configured > 0 and learned > 0 then return math.min(configured, learned) end
  return math.max(configured, learned)
end
-- The requests a minute calls are spaced at: the pace, below the limit (0: none).
local function paced(ceiling)
  local pace = num(h.pace)
  if pace > 0 and (ceiling == 0 or pace < ceiling) then return pace end
  return ceiling
end
-- Whether the fleet keeps a pace of rpm busy: each call finds the slot before it taken.
local function busy(rpm)
  return rpm > 0 and num(h.r_tat) + 60000000 / rpm >= now
end
local function save(ttl_ms)
  local out = {}
  for k, v in pairs(h) do
    out[#out + 1] = k
    out[#out + 1] = type(v) == 'number' and string.format('%.17g', v) or v
  end
  redis.call('HSET', KEYS[1], unpack(out))
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
"""
)

# ARGV: tokens, max_ahead_us, rpm_cfg, tpm_cfg, burst_us, ttl_ms, model, base,
# token_max_ahead_us, slow_start_rpm (0: no slow start).
# Returns {granted (1/0), wait_us, rpm, tpm, now_us}: a granted call may start after wait_us
# (its slot is reserved); a refused one should ask again in wait_us (nothing is reserved).
ACQUIRE = (
    _PRELUDE
    + """
h.rpm_cfg, h.tpm_cfg, h.model, h.base = num(ARGV[3]), num(ARGV[4]), ARGV[7], ARGV[8]
local tpm = limit(h.tpm_cfg, h.tpm_learned)
local ceiling = limit(h.rpm_cfg, h.rpm_learned)
if num(ARGV[10]) > 0 and h.pace_phase == nil and ceiling == 0 and tpm == 0 then
  h.pace, h.pace_base, h.pace_phase, h.grow_s, h.grow_at = ARGV[10], ARGV[10], 'start', 0, now
end
local rpm = paced(ceiling)
local burst = num(ARGV[5])
-- A provider that answered 429s under the burst allowance allows no burst.
if num(h.last_backoff) > 0 then burst = 0 end
local earliest = math.max(now, num(h.pause_until))
if rpm > 0 then earliest = math.max(earliest, num(h.r_tat) - burst) end
if tpm > 0 then earliest = math.max(earliest, num(h.t_tat) - burst) end
if rpm > 0 and not busy(rpm) then h.busy_since = now end
local wait = earliest - now
local max_ahead = num(ARGV[2])
if tpm > 0 then max_ahead = math.min(max_ahead, num(ARGV[9])) end
if wait > max_ahead then
  save(ARGV[6])
  return {0, math.floor(wait - max_ahead), rpm, tpm, now}
end
if rpm > 0 then h.r_tat = math.max(num(h.r_tat), earliest) + 60000000 / rpm end
if tpm > 0 then h.t_tat = math.max(num(h.t_tat), earliest) + num(ARGV[1]) * 60000000 / tpm end
h.req = num(h.req) + 1
save(ARGV[6])
return {1, math.floor(wait), rpm, tpm, now}
"""
)

# ARGV: tokens the slot was charged, ttl_ms. Gives back a slot reserved for a call that was
# not made (its job was cancelled, or its deadline passed, while it waited for the slot): the
# deployment's next free slot moves back by one call and its tokens, never before now.
GIVE_BACK = (
    _PRELUDE
    + """
local rpm = paced(limit(h.rpm_cfg, h.rpm_learned))
local tpm = limit(h.tpm_cfg, h.tpm_learned)
if rpm > 0 and num(h.r_tat) > now then
  h.r_tat = math.max(now, num(h.r_tat) - 60000000 / rpm)
end
if tpm > 0 and num(h.t_tat) > now then
  h.t_tat = math.max(now, num(h.t_tat) - num(ARGV[1]) * 60000000 / tpm)
end
h.req = math.max(0, num(h.req) - 1)
save(ARGV[2])
return 1
"""
)

# ARGV: granted_us (when the call's slot was granted), slot_us (the slot: when it is due),
# max_wait_us. Returns how long (us) a call whose slot has come should still wait before it
# leaves: until its slot as moved since its grant by pauses and backoffs, and at least until
# the pause (if any) ends. At most max_wait_us; 0: go now. Changes nothing.
DEPART = (
    _PRELUDE
    + """
local granted, slot = num(ARGV[1]), num(ARGV[2])
for at, to, q in string.gmatch(h.moves or '', '([^,;]+),([^,;]+),([^,;]+)') do
  at, to, q = tonumber(at), tonumber(to), tonumber(q)
  if at > granted then slot = to + math.max(0, slot - at) * q end
end
local wait = math.max(0, slot - now, num(h.pause_until) - now)
return math.floor(math.min(wait, num(ARGV[3])))
"""
)

# ARGV: token correction (charged - reserved), tokens charged, outcome, retry_after_us,
# header rpm, header tpm, adaptive (1/0), ttl_ms, granted_us (when the call's slot was
# granted, Redis time; 0: unknown). Returns the deployment's {rpm, tpm} afterwards.
SETTLE = (
    _PRELUDE
    + """
local tpm = limit(h.tpm_cfg, h.tpm_learned)
local correction = num(ARGV[1])
if tpm > 0 and correction ~= 0 then
  local base = num(h.t_tat)
  if correction > 0 then base = math.max(base, now) end
  h.t_tat = base + correction * 60000000 / tpm
end
h.tok = num(h.tok) + num(ARGV[2])
local adaptive = ARGV[7] == '1'
if adaptive and num(ARGV[5]) > 0 then h.rpm_learned = num(ARGV[5]) end
if adaptive and num(ARGV[6]) > 0 then h.tpm_learned = num(ARGV[6]) end
local ceiling = limit(h.rpm_cfg, h.rpm_learned)

-- The pace climbs while it is in use: calls wait for their slots (the next one is due).
local function climb()
  local elapsed = math.min(math.max(now - num(h.grow_at), 0), 1000000)
  h.grow_at = now
  if not busy(paced(ceiling)) then return end
  h.grow_s = num(h.grow_s) + elapsed / 1000000
  local pace
  if h.pace_phase == 'start' then
    pace = num(h.pace_base) * SLOW_START_GROWTH ^ h.grow_s
  else
    local k = tonumber(h.pace_k) or RECOVERY_S
    pace = num(h.pace_max) * (1 + CUBIC_C * (h.grow_s - k) ^ 3)
  end
  if (ceiling > 0 and pace >= ceiling) or pace >= MAX_PACE_RPM then
    h.pace, h.pace_phase = 0, 'done'
  else
    h.pace = pace
  end
end

-- The rate the provider admitted lately: from the last second's answers, else from the
-- calls sent over the last minute (0: too few to tell).
local function admitted_rpm()
  local into_second = (now % 1000000) / 1000000
  local answers = num(h.ok1) + num(h.prev_ok1) * (1 - into_second)
  if answers >= RATE_MIN_ANSWERS then return answers * 60 end
  local into_minute = (now % 60000000) / 60000000
  local sent = num(h.req) + num(h.prev_req) * (1 - into_minute)
  if sent < BACKOFF_MIN_CALLS then return 0 end
  local seen_us = math.min(now - num(h.created), 60000000)
  return sent * 60000000 / math.max(seen_us, 1000000)
end

local function back_off()
  local granted = num(ARGV[9])
  local last = num(h.last_backoff)
  if granted > 0 and granted < last then return end
  if granted == 0 and now - last < BACKOFF_SETTLE_US then return end
  local current = paced(ceiling)
  local base = current
  -- Below a pace that already drew 429s, the provider admits less than it is sent: the rate
  -- it admitted is the base, once the last second's answers all answer calls sent at the
  -- pace (the fleet has kept its pace busy for a second and the answers' lag).
  if h.pace_phase == 'probe' and now - num(h.busy_since) >= 1000000 + num(h.answer_lag) then
    local admitted = admitted_rpm()
    if admitted > 0 and admitted < base then base = admitted end
  end
  if base == 0 then base = admitted_rpm() end
  if base == 0 then return end
  local factor = BACKOFF_FACTOR
  if h.pace_phase ~= 'probe' and h.pace_phase ~= 'start' then factor = EDGE_BACKOFF_FACTOR end
  h.pace_max, h.pace, h.pace_phase = base, base * factor, 'probe'
  h.pace_k = ((1 - factor) / CUBIC_C) ^ (1 / 3)  -- when the curve is back at pace_max
  h.grow_s, h.grow_at, h.last_backoff = 0, now, now
end

-- The slots reserved from `at` on move to start at `to`, spaced q (>= 1) times wider.
local function move_slots(at, to, q)
  if to <= at and q <= 1 then return end
  if num(h.r_tat) > at then h.r_tat = to + (num(h.r_tat) - at) * q end
  if num(h.t_tat) > at then h.t_tat = to + (num(h.t_tat) - at) * q end
  local moves = {}
  for move in string.gmatch(h.moves or '', '[^;]+') do moves[#moves + 1] = move end
  moves[#moves + 1] = string.format('%d,%d,%.6f', at, to, q)
  while #moves > MAX_MOVES do table.remove(moves, 1) end
  h.moves = table.concat(moves, ';')
end

if ARGV[3] == 'rate_limited' then
  h.r429 = num(h.r429) + 1
  local rate, paused_to = paced(ceiling), math.max(num(h.pause_until), now)
  if num(ARGV[4]) > 0 then h.pause_until = math.max(num(h.pause_until), now + num(ARGV[4])) end
  if adaptive then back_off() end
  local slower = paced(ceiling)
  local q = (rate > 0 and slower > 0 and slower < rate) and rate / slower or 1
  move_slots(paused_to, math.max(num(h.pause_until), now), q)
elseif ARGV[3] == 'ok' then
  h.ok1 = num(h.ok1) + 1
  if num(ARGV[9]) > 0 then
    local lag = now - num(ARGV[9])
    h.answer_lag = h.answer_lag and 0.8 * num(h.answer_lag) + 0.2 * lag or lag
  end
  if adaptive and (h.pace_phase == 'start' or h.pace_phase == 'probe') then climb() end
end
save(ARGV[8])
return {paced(ceiling), limit(h.tpm_cfg, h.tpm_learned)}
"""
)
