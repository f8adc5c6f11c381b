// What the agent accepts from operators and controllers before anything runs: targets (a flake
// reference is never an option to Nix) and the windows on the wire (no timer can overflow).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { z } from 'zod';
import { controlRequestSchema } from '../agent/control.ts';
import { describeIssues } from '../shared/errors.ts';
import { MAX_SECONDS, targetSchema } from '../shared/model.ts';
import { clientMessageSchema } from '../shared/protocol.ts';

/** The problems `schema` finds in `value`, one line each (as the agent answers them). */
function problems(schema: z.ZodType, value: unknown): string {
  const r = schema.safeParse(value);
  assert.ok(!r.success, `accepted: ${JSON.stringify(value)}`);
  return describeIssues(r.error).join('\n');
}

describe('targets', () => {
  it('refuses a flake reference beginning with "-", naming the field', () => {
    for (const flake of ['-I#web1', '--option#web1', '-L#web1']) {
      assert.match(problems(targetSchema, { flake }), /^flake: must not begin with "-"/);
      assert.match(problems(clientMessageSchema, { type: 'activate', seq: 1, target: { flake }, sig: 'x' }), /target\.flake: must not begin with "-"/);
      assert.match(problems(controlRequestSchema, { cmd: 'activate', target: { flake } }), /target\.flake: must not begin with "-"/);
    }
    assert.ok(targetSchema.safeParse({ flake: 'github:example/fleet#web-1' }).success);
    assert.ok(targetSchema.safeParse({ flake: 'path:/srv/fleet#web1' }).success);
  });
});

describe('windows on the wire and the console', () => {
  const limit = `must be at most ${MAX_SECONDS} seconds (7 days)`;

  it('caps activate.timeoutSec and extend.seconds at MAX_SECONDS, naming the field and the limit', () => {
    const target = { storePath: '/nix/store/00000000000000000000000000000000-nixos-system-x' };
    assert.equal(problems(clientMessageSchema, { type: 'activate', seq: 1, target, timeoutSec: 3_000_000, sig: 'x' }), `timeoutSec: ${limit}`);
    assert.equal(problems(clientMessageSchema, { type: 'extend', seq: 1, seconds: 2 ** 31, sig: 'x' }), `seconds: ${limit}`);
    assert.equal(problems(controlRequestSchema, { cmd: 'activate', target, timeoutSec: 3_000_000 }), `timeoutSec: ${limit}`);
    assert.equal(problems(controlRequestSchema, { cmd: 'extend', seconds: 3_000_000 }), `seconds: ${limit}`);
    assert.ok(clientMessageSchema.safeParse({ type: 'activate', seq: 1, target, timeoutSec: MAX_SECONDS, sig: 'x' }).success);
    // Below the agent's own range is the agent's answer (timeout-out-of-range), not the schema's.
    assert.ok(clientMessageSchema.safeParse({ type: 'extend', seq: 1, seconds: 0, sig: 'x' }).success);
  });
});
