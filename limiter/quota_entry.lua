-- quota_entry.lua: replace a tenant's quota cache entry unless Redis holds a newer version.
--
-- Two changes of one tenant are ordered by the quota DB (tenants.version), but their writes of
-- the cache entry may reach Redis in either order (two admin requests, a retried publish). A
-- plain SET of the older one last would leave it for the entry's whole TTL, and every process
-- that does not hold the tenant yet (a new replica) would enforce it. So the entry is written
-- only when the one held is absent, or holds no version (a deleted tenant's {"unknown": true},
-- a corrupt entry: readers ignore those), or a version not newer than this one (equal: the
-- same change, or a tenant created again, whose versions start over at 1).
--
-- A deleted tenant's entry (version 0) carries no version to compare: it always replaces the
-- entry (see QuotaAdmin in limiter/quotas.py for the ordering this gives).
--
-- KEYS: tenant_quota_cache:<tenant> (one key: a Redis Cluster routes the call by it)
-- ARGV: entry (limiter.quotas.encode_quota's JSON), its version (0: a deleted tenant),
--       TTL in seconds
--
-- Reply: 1 if the entry was written, 0 if a newer version was held and kept.

local version = tonumber(ARGV[2])
if version > 0 then
  local held = redis.call('GET', KEYS[1])
  if held then
    local ok, data = pcall(cjson.decode, held)
    if ok and type(data) == 'table' then
      local held_version = tonumber(data['version'])
      if held_version and held_version > version then
        return 0
      end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
