// Probes: which failure is reported, what each failed attempt says, and stopping them.

import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { after, describe, it } from 'node:test';
import { runProbe, runProbes } from '../controller/probes.ts';

const servers: Server[] = [];
after(() => {
  for (const s of servers) s.closeAllConnections?.(), s.close();
});

/** An HTTP server whose `n`-th request (1-based) is handled by `answer(n)`: a status, or 'hang'. */
async function server(answer: (n: number) => number | 'hang'): Promise<string> {
  let n = 0;
  const s = createServer((_req, res) => {
    const a = answer(++n);
    if (a !== 'hang') res.writeHead(a).end();
  });
  servers.push(s);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  return `http://127.0.0.1:${(s.address() as { port: number }).port}/health`;
}

describe('probes', () => {
  it('an HTTP 503 beats a later timeout: the report says what the service answered', async () => {
    const url = await server((n) => (n === 1 ? 503 : 'hang'));
    const r = await runProbe({ http: url, expectStatus: 200 }, 2500);
    assert.equal(r.ok, false);
    assert.match(r.detail!, /answered 503, expected 200/);
    assert.match(r.detail!, /last attempt: .*no answer within/);
  });

  it('the latest among equally informative failures', async () => {
    const url = await server((n) => (n === 1 ? 503 : 502));
    const r = await runProbe({ http: url, expectStatus: 200 }, 1500);
    assert.equal(r.detail, `${url} answered 502, expected 200`);
  });

  it('a refused connection beats a later timeout', async () => {
    // Port 1 on loopback refuses; the budget's end then cuts the last attempt short.
    const r = await runProbe({ tcp: '127.0.0.1:1' }, 1100);
    assert.match(r.detail!, /^127\.0\.0\.1:1: ECONNREFUSED/);
  });

  it('reports each failed attempt that will be retried', async () => {
    const url = await server(() => 503);
    const seen: [string, number, string][] = [];
    const [r] = await runProbes([{ http: url, expectStatus: 200, name: 'health' }], 60, 2500, undefined, { onAttempt: (name, attempt, error) => seen.push([name, attempt, error]) });
    assert.equal(r!.ok, false);
    assert.ok(seen.length >= 2, JSON.stringify(seen));
    assert.deepEqual(seen[0], ['health', 1, `${url} answered 503, expected 200`]);
  });

  it('an abort stops a hanging attempt at once', async () => {
    const url = await server(() => 'hang');
    const ac = new AbortController();
    const started = Date.now();
    setTimeout(() => ac.abort(), 200);
    const r = await runProbe({ http: url, expectStatus: 200 }, 30_000, ac.signal);
    assert.ok(Date.now() - started < 2000);
    assert.equal(r.ok, false);
    assert.match(r.detail!, /interrupted/);
  });
});
