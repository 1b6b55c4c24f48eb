// Closed loop on the Open Inference Protocol (tensor-in) path: VUS virtual users (default 16)
// post the same JSON V2 infer body back to back for DURATION (default 15s) to
// BASE_URL/v2/models/MODEL/infer. The body (JSON `data` arrays, batch 1) is written by
// `python -m bench.oip` and given as BODY (absolute path). Used against this service and MLServer.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e BODY=/tmp/oip-body.json k6/oip.js
import http from 'k6/http';
import { check } from 'k6';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/$/, '');
const MODEL = __ENV.MODEL || 'rf-localizer';
const BODY = open(__ENV.BODY);
const HEADERS = { 'Content-Type': 'application/json', Accept: 'application/json' };

export const options = {
  scenarios: {
    closed_loop: {
      executor: 'constant-vus',
      vus: Number(__ENV.VUS || 16),
      duration: __ENV.DURATION || '15s',
      gracefulStop: '10s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(`${BASE_URL}/v2/models/${MODEL}/infer`, BODY, { headers: HEADERS });
  check(res, {
    'status 200': (r) => r.status === 200,
    'has outputs': (r) => {
      try {
        return r.json().outputs.length === 3;
      } catch (e) {
        return false;
      }
    },
  });
}
