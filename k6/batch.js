// Batch endpoint: VUS (default 2) closed-loop users post SIZE-item batches (default 16, built
// from the distinct cache=false payloads) for DURATION (default 20s). `captures` counts items
// answered; captures/s = its rate. Thresholds: no failures, every item a prediction.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 k6/batch.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, JSON_HEADERS, batchBody, parse } from './lib.js';

const SIZE = Number(__ENV.SIZE || 16);
const BODY = batchBody(SIZE);
const captures = new Counter('captures');

export const options = {
  scenarios: {
    batches: {
      executor: 'constant-vus',
      vus: Number(__ENV.VUS || 2),
      duration: __ENV.DURATION || '20s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(`${BASE_URL}/v1/predict/batch`, BODY, { headers: JSON_HEADERS });
  const results = ((parse(res) || {}).results) || [];
  const good = results.filter((x) => x.kind === 'prediction').length;
  captures.add(good);
  check(res, {
    'status 200': (r) => r.status === 200,
    [`${SIZE} predictions`]: () => good === SIZE,
  });
}
