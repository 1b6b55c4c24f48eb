// Where the service's CPU goes (used by `python -m bench.overhead`): MODE=live (GET
// /health/live: framework floor), MODE=invalid (a full predict body rejected with 422 after
// decoding and validation: body ingestion, no worker), MODE=predict (the whole path).
// VUS (8) closed loop for DURATION (8s). Thresholds: no unexpected status.
import http from 'k6/http';
import { check } from 'k6';
import { BASE_URL, JSON_HEADERS, predictBody } from './lib.js';

const MODE = __ENV.MODE || 'predict';
const BAD = predictBody(__VU).replace('"sample_rate_hz":48000.0', '"sample_rate_hz":47999.0');
const expected = MODE === 'invalid' ? 422 : 200;

export const options = {
  vus: Number(__ENV.VUS || 8),
  duration: __ENV.DURATION || '8s',
  thresholds: { checks: ['rate==1'] },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  let res;
  if (MODE === 'live') res = http.get(`${BASE_URL}/health/live`);
  else if (MODE === 'invalid') res = http.post(`${BASE_URL}/v1/predict`, BAD, { headers: JSON_HEADERS, responseCallback: http.expectedStatuses(422) });
  else res = http.post(`${BASE_URL}/v1/predict`, predictBody(__VU + __ITER), { headers: JSON_HEADERS });
  check(res, { [`status ${expected}`]: (r) => r.status === expected });
}
