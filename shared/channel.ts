// The session key of one authenticated connection: an ephemeral X25519 exchange whose public halves
// both signed transcripts cover, and the MAC that authenticates every agent message after `hello`.
//
// The signatures prove who is at each end; the MAC makes the rest of the conversation theirs too, so
// an on-path attacker can neither forge an `outcome` nor replay or reorder one (the counter).

import { createHash, createHmac, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, timingSafeEqual, type KeyObject } from 'node:crypto';
import { SUBPROTOCOL, canonicalJson } from './protocol.ts';

/** One side's ephemeral key pair for one connection. */
export class KeyExchange {
  /** the public half, raw 32 bytes in base64url: what travels in `challenge` and `hello` */
  readonly publicKey: string;
  private readonly privateKey: KeyObject;

  constructor() {
    const { publicKey, privateKey } = generateKeyPairSync('x25519');
    this.privateKey = privateKey;
    this.publicKey = publicKey.export({ format: 'jwk' }).x!;
  }

  /**
   * The MAC key for the agent's messages, bound to the whole handshake transcript. Throws on a peer
   * key that is not a usable X25519 point (all-zero shared secrets included).
   */
  macKey(peerPublicKey: string, handshake: string): Buffer {
    const peer = createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: peerPublicKey }, format: 'jwk' });
    const shared = diffieHellman({ privateKey: this.privateKey, publicKey: peer });
    if (shared.every((b) => b === 0)) throw new Error('the key exchange produced no secret');
    const salt = createHash('sha256').update(handshake).digest();
    return Buffer.from(hkdfSync('sha256', shared, salt, `${SUBPROTOCOL}/host-messages`, 32));
  }
}

function mac(key: Buffer, ctr: number, body: Record<string, unknown>): string {
  const { mac: _, ...rest } = body;
  return createHmac('sha256', key)
    .update(canonicalJson([`${SUBPROTOCOL}/host-message`, ctr, { ...rest, ctr }]))
    .digest('base64url');
}

/** Adds `ctr` and `mac` to an agent message. */
export function seal<T extends object>(key: Buffer, ctr: number, msg: T): T & { ctr: number; mac: string } {
  return { ...msg, ctr, mac: mac(key, ctr, msg as Record<string, unknown>) };
}

/**
 * Checks an agent message as it arrived (parsed JSON, before any schema strips or fills fields):
 * its MAC under this session's key and its counter, which must be exactly the next one.
 */
export function opens(key: Buffer, expectedCtr: number, raw: unknown): boolean {
  if (!raw || typeof raw !== 'object') return false;
  const m = raw as Record<string, unknown>;
  if (m.ctr !== expectedCtr || typeof m.mac !== 'string') return false;
  const want = Buffer.from(mac(key, expectedCtr, m));
  const got = Buffer.from(m.mac);
  return want.length === got.length && timingSafeEqual(want, got);
}
