// Closed loop: VUS virtual users (default 100) post distinct cache=false payloads back to back
// for DURATION (default 30s). SLA: no failed request, p95 < 300 ms.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 k6/load.js   (-e FORMAT=msgpack: MessagePack bodies)
import http from 'k6/http';
import { check } from 'k6';
import { BASE_URL, PREDICT_HEADERS, isPrediction, parse, predictBody } from './lib.js';

export const options = {
  scenarios: {
    closed_loop: {
      executor: 'constant-vus',
      vus: Number(__ENV.VUS || 100),
      duration: __ENV.DURATION || '30s',
      gracefulStop: '10s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    http_req_duration: [`p(95)<${__ENV.P95_MS || 300}`],
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const body = predictBody(__VU * 7 + __ITER);
  const res = http.post(`${BASE_URL}/v1/predict`, body, { headers: PREDICT_HEADERS });
  check(res, {
    'status 200': (r) => r.status === 200,
    'is a prediction': (r) => isPrediction(parse(r)),
  });
}
