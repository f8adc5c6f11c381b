// Reading the agent's metrics as Prometheus would: the text exposition format parsed by a maintained
// parser (parse-prometheus-text-format, the prom2json shape), then held to the format's rules the
// parser itself is lenient about (every family typed and described, numeric values, _total
// counters, cumulative histogram buckets ending in +Inf).

import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { request } from 'node:http';

export interface Sample {
  value?: string;
  labels?: Record<string, string>;
  buckets?: Record<string, string>;
  count?: string;
  sum?: string;
}
export interface Family {
  name: string;
  help: string;
  type: string;
  metrics: Sample[];
}

const parse = createRequire(import.meta.url)('parse-prometheus-text-format') as (text: string) => Family[];

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function number(v: string | undefined, what: string): number {
  assert.ok(v !== undefined && v !== '', `${what}: no value`);
  const n = v === '+Inf' ? Infinity : v === '-Inf' ? -Infinity : Number(v);
  assert.ok(!Number.isNaN(n), `${what}: "${v}" is not a number`);
  return n;
}

/** The families by name; fails the test on anything Prometheus would reject or misread. */
export function parseMetrics(text: string): Map<string, Family> {
  assert.ok(text.endsWith('\n'), 'the exposition ends with a newline');
  // In the text itself, each histogram's buckets come in ascending order of their bounds.
  const lastBound = new Map<string, number>();
  for (const line of text.split('\n')) {
    const b = /^([a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{(?:.*,)?le="([^"]+)"/.exec(line);
    if (!b) continue;
    const bound = number(b[2], `${b[1]} le`);
    assert.ok(bound > (lastBound.get(b[1]!) ?? -Infinity), `${b[1]}: bucket bounds ascend in the text`);
    lastBound.set(b[1]!, bound);
  }
  const families = new Map<string, Family>();
  for (const f of parse(text)) {
    assert.match(f.name, NAME);
    assert.ok(!families.has(f.name), `${f.name} appears once`);
    assert.ok(['COUNTER', 'GAUGE', 'HISTOGRAM'].includes(f.type), `${f.name} has a type (${f.type})`);
    assert.ok(f.help.length > 0, `${f.name} has a HELP line`);
    if (f.type === 'COUNTER') assert.match(f.name, /_total$/, 'counters end in _total');
    for (const m of f.metrics) {
      for (const l of Object.keys(m.labels ?? {})) assert.match(l, LABEL);
      if (f.type !== 'HISTOGRAM') {
        const v = number(m.value, f.name);
        if (f.type === 'COUNTER') assert.ok(v >= 0, `${f.name} is not negative`);
        continue;
      }
      // The parser keeps buckets in an object (whose key order is not the text's): sorted by bound.
      const bounds = Object.keys(m.buckets ?? {}).sort((a, b) => number(a, `${f.name} le`) - number(b, `${f.name} le`));
      assert.equal(bounds.at(-1), '+Inf', `${f.name}: there is a +Inf bucket`);
      let before = 0;
      for (const b of bounds) {
        const c = number(m.buckets![b], `${f.name} bucket ${b}`);
        assert.ok(c >= before, `${f.name}: buckets are cumulative`);
        before = c;
      }
      assert.equal(before, number(m.count, `${f.name}_count`), `${f.name}: +Inf equals _count`);
      number(m.sum, `${f.name}_sum`);
    }
    families.set(f.name, f);
  }
  return families;
}

/** The value of `name` with exactly these labels; undefined when there is no such sample. */
export function valueOf(families: Map<string, Family>, name: string, labels: Record<string, string> = {}): number | undefined {
  const f = families.get(name);
  const m = f?.metrics.find((s) => sameLabels(s.labels ?? {}, labels));
  return m?.value === undefined ? undefined : number(m.value, name);
}

/** A histogram's count and sum. */
export function histogramOf(families: Map<string, Family>, name: string): { count: number; sum: number; buckets: Record<string, number> } {
  const m = families.get(name)?.metrics[0];
  assert.ok(m, `${name} is there`);
  return {
    count: number(m.count, name),
    sum: number(m.sum, name),
    buckets: Object.fromEntries(Object.entries(m.buckets ?? {}).map(([b, c]) => [b, number(c, name)])),
  };
}

function sameLabels(a: Record<string, string>, b: Record<string, string>): boolean {
  const ka = Object.keys(a).filter((k) => a[k] !== '');
  const kb = Object.keys(b).filter((k) => b[k] !== '');
  return ka.length === kb.length && ka.every((k) => a[k] === b[k]);
}

/** GET http://host:port/path: status, headers and body. */
export function httpGet(port: number, path = '/metrics', host = '127.0.0.1'): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port, path, method: 'GET', agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type'] ?? ''), body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Scrapes and parses /metrics. */
export async function scrape(port: number): Promise<Map<string, Family>> {
  const r = await httpGet(port);
  assert.equal(r.status, 200, r.body);
  assert.match(r.type, /^text\/plain; version=0\.0\.4/);
  return parseMetrics(r.body);
}
