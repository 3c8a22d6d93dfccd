-- wrk body script: POSTs Alertmanager v4 webhooks (~1 KB, one alert each).
-- MODE=distinct (default): every request is a new alert (unique instance and startsAt).
-- MODE=same: every request re-delivers one alert (the dedup path).
-- PREFIX: prepended to every alert's id, so that several wrk processes send distinct alerts.
local mode = os.getenv("MODE") or "distinct"
local prefix = os.getenv("PREFIX") or ""
local counter = 0
local next_id = 0

-- Runs in the main Lua state; sets the global `thread_id` in each thread's own state.
function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
end

local template = [[{"receiver":"reflex","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"LoadTest","instance":"host-%s.example.internal:9100","job":"node","mountpoint":"/var","device":"/dev/sda1","fstype":"ext4","severity":"warning"},"annotations":{"summary":"Load test alert %s","description":"Filesystem /var on host-%s is 93%% full","runbook_url":"https://runbooks.example.internal/disk-space-low"},"startsAt":"2026-11-22T12:00:00.000000000Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus.example.internal:9090/graph?g0.expr=node_filesystem_avail_bytes","fingerprint":""}],"groupLabels":{"alertname":"LoadTest"},"commonLabels":{"alertname":"LoadTest","job":"node","severity":"warning"},"commonAnnotations":{},"externalURL":"http://alertmanager.example.internal:9093","version":"4","groupKey":"{}:{alertname=\"LoadTest\"}","truncatedAlerts":0}]]

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  local id
  if mode == "same" then
    id = "0"
  else
    counter = counter + 1
    id = string.format("%s%d-%d", prefix, thread_id or 0, counter)
  end
  return wrk.format(nil, "/api/v1/webhooks/alertmanager", nil, string.format(template, id, id, id))
end
