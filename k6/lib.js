// Shared helpers for the heimdall-inference k6 scripts (imported in init context).
//
// Payloads come from k6/data/ (written by `python -m bench.payloads`): one body per file,
// read with open() in the init context. The request_id of each body is kept in a SharedArray
// (parsed once, shared by all VUs). The bodies themselves are NOT in a SharedArray on purpose:
// reading a SharedArray element deserialises it again on every access, measured at ~90 ms of
// k6 CPU for one 260 kB body - that made k6, not the service, the bottleneck. open() results
// are cached by k6, so each VU only holds references to the file text (no parsing).
import { SharedArray } from 'k6/data';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/$/, '');
export const JSON_HEADERS = { 'Content-Type': 'application/json', Accept: 'application/json' };
// FORMAT=msgpack: predict bodies are sent as MessagePack with raw IQ bytes (answers stay JSON).
export const FORMAT = __ENV.FORMAT || 'json';
export const PREDICT_HEADERS = FORMAT === 'msgpack'
  ? { 'Content-Type': 'application/msgpack', Accept: 'application/json' }
  : JSON_HEADERS;

const INDEX = JSON.parse(open('./data/index.json'));
const name = (kind, i) => `./data/${kind}-${String(i).padStart(2, '0')}.json`;

// Raw JSON text of each body (per VU, unparsed).
export const PREDICT = Array.from({ length: INDEX.predict }, (_, i) => open(name('predict', i)));
export const CACHE = Array.from({ length: INDEX.cache }, (_, i) => open(name('cache', i)));

// request_id of every predict body, parsed once for all VUs.
export const PREDICT_IDS = new SharedArray('predict request ids', () =>
  PREDICT.map((text) => JSON.parse(text).request_id));

// The MessagePack bodies (binary), loaded only when asked for.
const PREDICT_MSGPACK = FORMAT === 'msgpack'
  ? Array.from({ length: INDEX.predict },
    (_, i) => open(name('predict', i).replace(/\.json$/, '.msgpack'), 'b'))
  : null;

// A predict body in FORMAT (send it with PREDICT_HEADERS).
export function predictBody(i) {
  return PREDICT_MSGPACK ? PREDICT_MSGPACK[i % PREDICT_MSGPACK.length] : PREDICT[i % PREDICT.length];
}

export function cacheBody(i) {
  return CACHE[i % CACHE.length];
}

// A /v1/predict/batch body of `size` items built from the distinct cache=false payloads
// (call in init context; the body is serialised once per VU).
export function batchBody(size) {
  const items = [];
  for (let i = 0; i < size; i++) items.push(PREDICT[i % PREDICT.length]);
  return `{"items":[${items.join(',')}]}`;
}

export function parse(res) {
  try {
    return res.json();
  } catch (e) {
    return null;
  }
}

export function isPrediction(body) {
  return body !== null && typeof body === 'object' && body.position !== undefined &&
    typeof body.position.latitude === 'number' && typeof body.position.longitude === 'number' &&
    body.uncertainty !== undefined && Array.isArray(body.uncertainty.ellipses) &&
    body.uncertainty.ellipses.length > 0 && body.model !== undefined &&
    typeof body.model.version === 'string';
}
