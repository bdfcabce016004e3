#!/usr/bin/env bash
# Least-privilege Redis ACL users for relay (Redis 7.0 or newer: key read/write
# permissions and selectors).
#
#   RELAY_ACL_PASSWORD=... relay-acl.sh gateway      USER TENANT [TENANT...]
#   RELAY_ACL_PASSWORD=... relay-acl.sh orchestrator USER TENANT [TENANT...]
#   RELAY_ACL_PASSWORD=... relay-acl.sh reaper       USER TENANT [TENANT...]
#   add --setuser before the role for an "ACL SETUSER" command (pipe it to
#   redis-cli) instead of a line for an ACL file (aclfile in redis.conf).
#
# The password is stored as its SHA-256 (#...), never in clear; the same
# password goes into the user's URL: redis[s]://USER:PASSWORD@host:port/0.
# A gateway serving several tenants gets each of them; its own probe channel
# lives under its redis.tenant, which must be one of them.
#
# What each role may do (docs/DEPLOYMENT.md "Redis security" explains why):
#   gateway       read every key of its tenants; write only cancel tombstones,
#                 budget answers (pending, decided, decision) and a stream's
#                 epoch; subscribe to its tenants' channels; publish only
#                 cancel nudges and its own probes. It cannot add events,
#                 bump a seq or change a request's state.
#   orchestrator  read and write its tenants' request keys, activity index
#                 and leases, read cancel tombstones, publish events (inside
#                 the publish script) and subscribe only to the cancel channel.
#   reaper        the gateways' lease reaper (lease.reaper_redis_url): declare
#                 orchestrators lost, claim their requests and publish their
#                 terminal events (the publish script). It reads and writes
#                 request keys, the activity index and the leases; it cannot
#                 subscribe, cancel, or touch anything else.
# Neither can run EVAL with its own source, KEYS, SCAN, FLUSH*, CONFIG,
# DEBUG, ACL, MONITOR or anything else not listed here; a script loaded with
# SCRIPT LOAD runs with the caller's permissions, so it cannot widen them.
set -euo pipefail

usage() {
  echo "usage: RELAY_ACL_PASSWORD=... $0 [--setuser] gateway|orchestrator|reaper USER TENANT [TENANT...]" >&2
  exit 2
}

setuser=0
if [[ "${1:-}" == "--setuser" ]]; then
  setuser=1
  shift
fi
[[ $# -ge 3 ]] || usage
role=$1
user=$2
shift 2

[[ "$user" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "$0: invalid user name: $user" >&2; exit 2; }
for tenant in "$@"; do
  # The tenant rule of relay/wire/keys.py: no glob characters can reach a pattern.
  [[ "$tenant" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "$0: invalid tenant: $tenant" >&2; exit 2; }
done
if [[ -z "${RELAY_ACL_PASSWORD:-}" ]]; then
  echo "$0: set RELAY_ACL_PASSWORD to the user's password" >&2
  exit 2
fi
hash=$(printf '%s' "$RELAY_ACL_PASSWORD" | sha256sum | cut -d' ' -f1)

# Connection set-up: PING (health checks, /readyz), SELECT (a /db other than
# 0 in the URL). AUTH and HELLO are always allowed.
common="+ping +select"
# On a Redis Cluster (redis.mode = "cluster"): the clients read the slot map
# (CLUSTER SLOTS), the key positions of commands (COMMAND) and follow a
# migrating slot (ASKING); every channel is a
# shard channel (SPUBLISH, SSUBSCRIBE, SUNSUBSCRIBE) and the tenant-wide one
# is split by slot (relay:T:events:{N}). Harmless on one server.
cluster="+cluster|slots +asking +command"

case "$role" in
  gateway)
    # Reads: replay (XRANGE, MGET, GET, HGETALL), the console's request list
    # (ZREVRANGEBYSCORE, EXISTS, HGET, HVALS; ZMSCORE for a token scoped to
    # requests), the hub's active requests (ZRANGEBYSCORE), a scoped token's
    # cancel check (HEXISTS), the CLI's id lookup (ZREVRANGE, HKEYS).
    # Writes: a cancel (MULTI: SET ... GET + PUBLISH), budget_answer.lua
    # (GET, DEL, HSET, RPUSH, EXPIRE) and epoch_bump.lua (GET, SET), run with
    # EVALSHA and loaded with SCRIPT LOAD when Redis lost them. Snapshots: HKEYS,
    # then a MULTI of HGETALL, GET, STRLEN, GETRANGE (the agents' texts).
    cmds="$common +subscribe +unsubscribe +get +mget +exists +hget +hgetall +hvals +hkeys"
    cmds+=" +hexists +xrange +zrangebyscore +zrevrangebyscore +zrevrange +zmscore +strlen +getrange"
    cmds+=" +set +del +hset +rpush +expire +multi +exec +discard +evalsha +script|load"
    cmds+=" $cluster +ssubscribe +sunsubscribe"
    keys="" chans="" pubs=""
    # A pattern must grant every permission a command needs on a key (SET ...
    # GET reads and writes), hence %RW, not %W, on what a gateway writes.
    for t in "$@"; do
      keys+=" %R~relay:$t:* %RW~relay:$t:cancel:* %RW~relay:$t:req:*:pending"
      keys+=" %RW~relay:$t:req:*:decided %RW~relay:$t:req:*:decision %RW~relay:$t:req:*:epoch"
      chans+=" &relay:$t:*"
      pubs+=" &relay:$t:cancels &relay:$t:probe:*"
    done
    # PUBLISH only in a selector, with only the cancel and probe channels: a
    # gateway can subscribe to every channel of its tenants but cannot inject
    # events into them.
    selector="(+publish +spublish$pubs)"
    ;;
  orchestrator)
    # publish.lua: TIME GET SET EXISTS DEL HGET HMGET HSET XREVRANGE INCR
    # XADD PUBLISH EXPIRE, and for the agents' texts APPEND GETRANGE HINCRBY HKEYS;
    # budget_add/open/timeout.lua: HINCRBY HSETNX RPUSH;
    # the publish pipeline: ZADD EXPIRE ZREMRANGEBYSCORE; budget waits: BLPOP
    # HGET GET; cancel checks: GET; the lease (lease_renew.lua, lease_request.lua
    # and its pipelines): ZSCORE ZADD HMGET HDEL SADD SREM EXPIRE, ZREM on close.
    cmds="$common +evalsha +script|load +time +get +set +exists +del +hget +hmget +hset"
    cmds+=" +hsetnx +hdel +hincrby +incr +xadd +xrevrange +expire +rpush +blpop +publish"
    cmds+=" +zadd +zremrangebyscore +zscore +zrem +sadd +srem +append +getrange +hkeys"
    cmds+=" $cluster +spublish"
    keys="" chans="" subs=""
    for t in "$@"; do
      keys+=" %R~relay:$t:* %RW~relay:$t:req:* %RW~relay:$t:active"
      keys+=" %RW~relay:$t:leases:* %RW~relay:$t:orch:*"
      chans+=" &relay:$t:req:* &relay:$t:events &relay:$t:events:*"
      subs+=" &relay:$t:cancels"
    done
    # SUBSCRIBE only in a selector, with only the cancel channel: an
    # orchestrator publishes events but cannot listen to other requests.
    selector="(+subscribe +unsubscribe +ssubscribe +sunsubscribe$subs)"
    ;;
  reaper)
    # lease_due.lua: TIME ZRANGEBYSCORE ZSCORE ZADD ZREMRANGEBYSCORE; an
    # orchestrator's requests: SMEMBERS SREM SCARD, then ZREM DEL;
    # lease_fence.lua: HGET HMGET HSET GET HGETALL; budget_timeout.lua: DEL
    # RPUSH EXPIRE; publish.lua and its pipeline (as for an orchestrator);
    # lease_finish.lua: TTL.
    cmds="$common +evalsha +script|load +time +get +set +exists +del +hget +hmget +hset"
    cmds+=" +hgetall +incr +xadd +xrevrange +expire +ttl +rpush +publish"
    cmds+=" +zadd +zrangebyscore +zremrangebyscore +zscore +zrem +smembers +srem +scard"
    cmds+=" +hincrby +hkeys +append +getrange"
    cmds+=" $cluster +spublish"
    keys="" chans=""
    for t in "$@"; do
      keys+=" %RW~relay:$t:req:* %RW~relay:$t:active %RW~relay:$t:leases:* %RW~relay:$t:orch:*"
      chans+=" &relay:$t:req:* &relay:$t:events &relay:$t:events:*"
    done
    # No selector: PUBLISH (inside the publish script) is its only channel use.
    selector=""
    ;;
  *)
    usage
    ;;
esac

rules="on #$hash sanitize-payload resetkeys resetchannels -@all $cmds$keys$chans"
if [[ $setuser -eq 1 ]]; then
  if [[ -n "$selector" ]]; then
    echo "ACL SETUSER $user reset $rules \"$selector\""
  else
    echo "ACL SETUSER $user reset $rules"
  fi
else
  echo "user $user $rules${selector:+ $selector}"
fi
