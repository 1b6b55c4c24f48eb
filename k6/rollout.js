// Load while a new model version is promoted (the promotion runs beside k6; see README.md).
// VUS (default 20) closed-loop users for DURATION (default 60s); every answer's
// model.version is counted in `model_versions{version:...}`. Thresholds: zero failed
// requests; VERSIONS (default "1,2") lists the versions shown in the summary.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VERSIONS=1,2 k6/rollout.js &
//   sleep 15 && heimdall-inference promote 2
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, JSON_HEADERS, parse, predictBody } from './lib.js';

const versions = new Counter('model_versions');
const listed = (__ENV.VERSIONS || '1,2').split(',').map((v) => v.trim()).filter(Boolean);

const thresholds = {
  http_req_failed: ['rate==0'],
  checks: ['rate==1'],
  http_req_duration: [`p(99)<${__ENV.P99_MS || 1000}`],
};
// A threshold on each tagged sub-metric makes its count appear in the end-of-test summary.
for (const v of listed) thresholds[`model_versions{version:${v}}`] = ['count>=0'];

export const options = {
  scenarios: {
    during_rollout: {
      executor: 'constant-vus',
      vus: Number(__ENV.VUS || 20),
      duration: __ENV.DURATION || '60s',
    },
  },
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(`${BASE_URL}/v1/predict`, predictBody(__VU * 7 + __ITER),
    { headers: JSON_HEADERS });
  const body = parse(res);
  const version = body && body.model ? String(body.model.version) : 'none';
  versions.add(1, { version });
  check(res, { 'status 200': (r) => r.status === 200 });
}
