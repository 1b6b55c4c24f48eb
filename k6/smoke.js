// Every route once, with checks on the bodies. Fails (exit != 0) unless every check passes.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 k6/smoke.js
import http from 'k6/http';
import { check, group } from 'k6';
import { BASE_URL, CACHE, JSON_HEADERS, PREDICT, PREDICT_IDS, batchBody, isPrediction, parse } from './lib.js';

const BATCH = batchBody(4);

export const options = {
  vus: 1,
  iterations: 1,
  thresholds: {
    checks: ['rate==1'],
    http_req_failed: ['rate==0'],
  },
};

const ok = { responseCallback: http.expectedStatuses(200) };

export default function () {
  group('health', () => {
    const live = http.get(`${BASE_URL}/health/live`, ok);
    check(live, {
      'live 200': (r) => r.status === 200,
      'live body': (r) => (parse(r) || {}).status === 'live',
    });
    const ready = http.get(`${BASE_URL}/health/ready`, ok);
    check(ready, {
      'ready 200': (r) => r.status === 200,
      'ready body': (r) => (parse(r) || {}).status === 'ready',
    });
  });

  let version = null;
  group('models', () => {
    const models = http.get(`${BASE_URL}/v1/models`, ok);
    const body = parse(models) || {};
    const versions = Object.keys(body.versions || {});
    version = versions.length ? versions[0] : null;
    check(models, {
      'models 200': (r) => r.status === 200,
      'models lists a resident version': () => version !== null,
      'models has routing weights': () => Object.keys((body.routing || {}).weights || {}).length > 0,
    });
    const one = http.get(`${BASE_URL}/v1/models/${version}`, ok);
    const desc = parse(one) || {};
    check(one, {
      'model version 200': (r) => r.status === 200,
      'model version body': () => desc.version === version && desc.capture !== undefined &&
        typeof desc.sha256 === 'string',
    });
    const missing = http.get(`${BASE_URL}/v1/models/no-such-version`,
      { responseCallback: http.expectedStatuses(404) });
    check(missing, {
      'unknown version 404 problem': (r) => r.status === 404 &&
        String(r.headers['Content-Type']).startsWith('application/problem+json'),
    });
  });

  group('predict', () => {
    const res = http.post(`${BASE_URL}/v1/predict`, PREDICT[0], { headers: JSON_HEADERS, ...ok });
    const body = parse(res);
    check(res, {
      'predict 200': (r) => r.status === 200,
      'predict body is a prediction': () => isPrediction(body),
      'predict echoes request_id': () => body !== null && body.request_id === PREDICT_IDS[0],
      'predict has 3 ellipses': () => body !== null && body.uncertainty.ellipses.length === 3,
      'predict cache=false not cached': () => body !== null && body.cached === false,
    });
    // Same cacheable body twice: the second may be served from the cache (the store is
    // asynchronous, so only the answer's validity is checked here).
    http.post(`${BASE_URL}/v1/predict`, CACHE[0], { headers: JSON_HEADERS, ...ok });
    const again = http.post(`${BASE_URL}/v1/predict`, CACHE[0], { headers: JSON_HEADERS, ...ok });
    check(again, { 'cacheable predict 200': (r) => r.status === 200 && isPrediction(parse(r)) });
  });

  group('batch', () => {
    const res = http.post(`${BASE_URL}/v1/predict/batch`, BATCH, { headers: JSON_HEADERS, ...ok });
    const body = parse(res) || {};
    const results = body.results || [];
    check(res, {
      'batch 200': (r) => r.status === 200,
      'batch has 4 results': () => results.length === 4,
      'batch items are predictions': () => results.every((x) => x.kind === 'prediction' && isPrediction(x)),
    });
  });

  group('schema', () => {
    const res = http.get(`${BASE_URL}/schema/openapi.json`, ok);
    const body = parse(res) || {};
    check(res, {
      'openapi 200': (r) => r.status === 200,
      'openapi documents /v1/predict': () => typeof body.openapi === 'string' &&
        body.paths !== undefined && body.paths['/v1/predict'] !== undefined,
    });
  });

  group('metrics', () => {
    // 404 until telemetry is enabled/landed; 200 must be a Prometheus exposition.
    const res = http.get(`${BASE_URL}/metrics`, { responseCallback: http.expectedStatuses(200, 404) });
    check(res, {
      'metrics 200 or 404': (r) => r.status === 200 || r.status === 404,
      'metrics exposition when 200': (r) => r.status !== 200 || /^# (HELP|TYPE) /m.test(r.body),
    });
  });

  group('errors', () => {
    const bad = { responseCallback: http.expectedStatuses({ min: 400, max: 499 }) };
    const empty = http.post(`${BASE_URL}/v1/predict`,
      JSON.stringify({ receivers: [], sample_rate_hz: 48000 }), { headers: JSON_HEADERS, ...bad });
    const p1 = parse(empty) || {};
    check(empty, {
      'empty receivers 400': (r) => r.status === 400,
      'empty receivers is problem+json': (r) =>
        String(r.headers['Content-Type']).startsWith('application/problem+json'),
      'empty receivers names the field': () => (p1.errors || []).some((e) => String(e.field).includes('receivers')),
    });
    const short = JSON.parse(PREDICT[1]);
    short.receivers[0].iq = short.receivers[0].iq.slice(0, 4000);
    const wrong = http.post(`${BASE_URL}/v1/predict`, JSON.stringify(short), { headers: JSON_HEADERS, ...bad });
    const p2 = parse(wrong) || {};
    check(wrong, {
      'short IQ is 4xx problem': (r) => r.status >= 400 && r.status < 500 &&
        String(r.headers['Content-Type']).startsWith('application/problem+json') && p2.status === r.status,
      'short IQ says what to fix': () => /samples/.test(String(p2.detail)),
    });
    const media = http.post(`${BASE_URL}/v1/predict`, 'x', { headers: { 'Content-Type': 'text/plain' }, ...bad });
    check(media, { 'text/plain is 415': (r) => r.status === 415 });
  });
}
