// Cache-hit path at low load: a few cache=true payloads repeated at RATE/s (default 20) for
// DURATION (default 15s) after one priming pass. Thresholds: >= 95 % of answers cached,
// cache-hit latency p50 < 2 ms (Trend `cache_hit_duration` on cached answers only).
//   k6 run -e BASE_URL=http://127.0.0.1:8000 k6/cache.js
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Rate, Trend } from 'k6/metrics';
import { BASE_URL, CACHE, JSON_HEADERS, cacheBody, parse } from './lib.js';

const cachedRate = new Rate('cached');
const hitDuration = new Trend('cache_hit_duration', true);

export const options = {
  scenarios: {
    hits: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 20),
      timeUnit: '1s',
      duration: __ENV.DURATION || '15s',
      preAllocatedVUs: 5,
      maxVUs: 20,
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    cached: ['rate>=0.95'],
    cache_hit_duration: [`med<${__ENV.HIT_P50_MS || 2}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  // Prime: compute each payload once, then give the background cache store a moment.
  for (const body of CACHE) { // plain array of file texts
    http.post(`${BASE_URL}/v1/predict`, body, { headers: JSON_HEADERS });
  }
  sleep(0.5);
}

export default function () {
  const res = http.post(`${BASE_URL}/v1/predict`, cacheBody(__ITER),
    { headers: JSON_HEADERS });
  const body = parse(res);
  const hit = res.status === 200 && body !== null && body.cached === true;
  cachedRate.add(hit);
  if (hit) hitDuration.add(res.timings.duration);
  check(res, { 'status 200': (r) => r.status === 200 });
}
