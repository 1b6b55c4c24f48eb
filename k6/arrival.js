// Open loop: a constant arrival rate of RATE requests/s (default 50) for DURATION (default
// 30s), distinct cache=false payloads. Latency is measured against the schedule, not the
// client's pace. Thresholds: no failures, no dropped iterations, p50 <= P50_MS (default 8),
// p99 <= P99_MS (default 25) - the design's targets at half of saturation.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e RATE=60 -e DURATION=30s k6/arrival.js
import http from 'k6/http';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { BASE_URL, PREDICT_HEADERS, predictBody } from './lib.js';

const RATE = Number(__ENV.RATE || 50);
// The service's own view (timing_ms.total): the rest of http_req_duration is the HTTP server,
// the network stack and scheduling on a shared machine.
const serverTotal = new Trend('server_total_ms', true);

export const options = {
  scenarios: {
    open_loop: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: Math.max(10, Math.ceil(RATE / 2)),
      maxVUs: Math.max(50, RATE * 2),
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    dropped_iterations: ['count==0'],
    http_req_duration: [`med<=${__ENV.P50_MS || 8}`, `p(99)<=${__ENV.P99_MS || 25}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(`${BASE_URL}/v1/predict`, predictBody(__ITER),
    { headers: PREDICT_HEADERS });
  if (check(res, { 'status 200': (r) => r.status === 200 })) {
    serverTotal.add(res.json('timing_ms.total'));
  }
}
