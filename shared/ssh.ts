// SSH keys as identities: OpenSSH public key lines and private key files (ssh-ed25519), SHA256
// fingerprints, SSHSIG-framed signatures (the format of `ssh-keygen -Y sign`, so a signature made for
// Snapback can never pass as an SSH login), a minimal ssh-agent client, and OpenSSH's `*`/`?` patterns.

import { createHash, createPrivateKey, createPublicKey, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { readInput } from './input.ts';
import { createConnection } from 'node:net';
import { SnapbackError } from './errors.ts';

export const SIG_NAMESPACE = 'snapback.v1@snapback';

// ---- SSH wire encoding (RFC 4251) -----------------------------------------------------------------

class Reader {
  private off = 0;
  private readonly buf: Buffer;
  constructor(buf: Buffer) {
    this.buf = buf;
  }
  u32(): number {
    if (this.off + 4 > this.buf.length) throw new Error('truncated');
    const v = this.buf.readUInt32BE(this.off);
    this.off += 4;
    return v;
  }
  bytes(): Buffer {
    const n = this.u32();
    if (this.off + n > this.buf.length) throw new Error('truncated');
    const v = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return v;
  }
  string(): string {
    return this.bytes().toString('utf8');
  }
  raw(n: number): Buffer {
    if (this.off + n > this.buf.length) throw new Error('truncated');
    const v = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return v;
  }
  get done(): boolean {
    return this.off >= this.buf.length;
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
function sshString(data: Buffer | string): Buffer {
  const b = typeof data === 'string' ? Buffer.from(data) : data;
  return Buffer.concat([u32(b.length), b]);
}

// ---- public keys --------------------------------------------------------------------------------

export interface PublicKey {
  type: 'ssh-ed25519';
  /** the SSH wire blob: string "ssh-ed25519", string key(32) */
  blob: Buffer;
  raw: Buffer;
  comment: string;
  /** `SHA256:…` as `ssh-keygen -l` prints it */
  fingerprint: string;
  key: KeyObject;
}

export function fingerprint(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

export function publicKeyFromBlob(blob: Buffer, comment = ''): PublicKey {
  const r = new Reader(blob);
  const type = r.string();
  if (type !== 'ssh-ed25519') throw new SnapbackError('bad-request', `unsupported key type ${type}: only ssh-ed25519 keys are supported`);
  const raw = r.bytes();
  if (raw.length !== 32 || !r.done) throw new SnapbackError('bad-request', 'malformed ssh-ed25519 public key');
  const key = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' });
  return { type, blob: Buffer.from(blob), raw: Buffer.from(raw), comment, fingerprint: fingerprint(blob), key };
}

/**
 * Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`), also in `authorized_keys` form
 * with leading options (`from="…",no-pty ssh-ed25519 AAAA…`).
 */
export function parsePublicKeyLine(line: string): PublicKey {
  const fields = line.trim().split(/\s+/);
  const at = fields.findIndex((f) => /^(ssh-|ecdsa-|sk-)/.test(f));
  if (at < 0 || !fields[at + 1]) throw new SnapbackError('bad-request', `not an OpenSSH public key line: "${line.slice(0, 60)}"`);
  const blob = Buffer.from(fields[at + 1]!, 'base64');
  const pk = publicKeyFromBlob(blob, fields.slice(at + 2).join(' '));
  if (fields[at] !== pk.type) throw new SnapbackError('bad-request', `key type ${fields[at]} does not match its data`);
  return pk;
}

export function formatPublicKey(pk: PublicKey): string {
  return `${pk.type} ${pk.blob.toString('base64')}${pk.comment ? ` ${pk.comment}` : ''}`;
}

// ---- signatures (SSHSIG framing, PROTOCOL.sshsig) --------------------------------------------------

/** The bytes an SSHSIG signature actually covers: preamble, namespace, hash algorithm, H(message). */
export function sshsigSignedData(message: Buffer | string, namespace = SIG_NAMESPACE): Buffer {
  const digest = createHash('sha512').update(message).digest();
  return Buffer.concat([Buffer.from('SSHSIG'), sshString(namespace), sshString(''), sshString('sha512'), sshString(digest)]);
}

/** Verifies a base64 SSH signature blob (`string "ssh-ed25519", string sig`) over `message`. */
export function verifySignature(pk: PublicKey, message: Buffer | string, signatureB64: string): boolean {
  try {
    const r = new Reader(Buffer.from(signatureB64, 'base64'));
    if (r.string() !== pk.type) return false;
    const sig = r.bytes();
    if (!r.done || sig.length !== 64) return false;
    return cryptoVerify(null, sshsigSignedData(message), pk.key, sig);
  } catch {
    return false;
  }
}

/** The armored form `ssh-keygen -Y verify` reads (used to prove interoperability). */
export function armorSignature(pk: PublicKey, signatureB64: string, namespace = SIG_NAMESPACE): string {
  const blob = Buffer.concat([
    Buffer.from('SSHSIG'),
    u32(1),
    sshString(pk.blob),
    sshString(namespace),
    sshString(''),
    sshString('sha512'),
    sshString(Buffer.from(signatureB64, 'base64')),
  ]);
  const b64 = blob.toString('base64').replace(/(.{70})/g, '$1\n');
  return `-----BEGIN SSH SIGNATURE-----\n${b64}\n-----END SSH SIGNATURE-----\n`;
}

/** Something that signs with an SSH key: a key file or an ssh-agent. */
export interface Signer {
  readonly publicKey: PublicKey;
  /** base64 SSH signature blob over `message`, SSHSIG-framed */
  sign(message: Buffer | string): Promise<string>;
  readonly source: string;
}

// ---- private key files ----------------------------------------------------------------------------

export interface KeyFile {
  publicKey: PublicKey;
  /** undefined when the file is encrypted with a passphrase */
  privateKey?: KeyObject;
}

/** Reads an OpenSSH private key file (`-----BEGIN OPENSSH PRIVATE KEY-----`, ssh-ed25519). */
export function readKeyFile(path: string): KeyFile {
  const text = readInput(path, 'the SSH key');
  const m = /-----BEGIN OPENSSH PRIVATE KEY-----([\s\S]+?)-----END OPENSSH PRIVATE KEY-----/.exec(text);
  if (!m) throw new SnapbackError('config-invalid', `${path} is not an OpenSSH private key (expected "BEGIN OPENSSH PRIVATE KEY"; convert with ssh-keygen -p -f)`);
  try {
    const buf = Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64');
    const magic = 'openssh-key-v1\0';
    if (buf.subarray(0, magic.length).toString('latin1') !== magic) throw new Error('bad magic');
    const r = new Reader(buf.subarray(magic.length));
    const cipher = r.string();
    r.string(); // kdf name
    r.bytes(); // kdf options
    if (r.u32() !== 1) throw new Error('more than one key');
    const publicKey = publicKeyFromBlob(r.bytes());
    const section = r.bytes();
    if (cipher !== 'none') return { publicKey };
    const s = new Reader(section);
    if (s.u32() !== s.u32()) throw new Error('check bytes differ');
    if (s.string() !== 'ssh-ed25519') throw new Error('key type');
    const pub = s.bytes();
    const priv = s.bytes();
    publicKey.comment = s.string();
    const privateKey = createPrivateKey({
      key: { kty: 'OKP', crv: 'Ed25519', d: priv.subarray(0, 32).toString('base64url'), x: pub.toString('base64url') },
      format: 'jwk',
    });
    return { publicKey, privateKey };
  } catch (err) {
    if (err instanceof SnapbackError) throw new SnapbackError('config-invalid', `${path}: ${err.message}`);
    throw new SnapbackError('config-invalid', `cannot parse the SSH key ${path}: ${(err as Error).message}`);
  }
}

export function keyFileSigner(path: string, file: KeyFile = readKeyFile(path)): Signer {
  const { privateKey, publicKey } = file;
  if (!privateKey) throw new SnapbackError('config-invalid', `${path} is encrypted and no ssh-agent holds it: run "ssh-add ${path}" (with SSH_AUTH_SOCK set)`);
  return {
    publicKey,
    source: path,
    sign: async (message) =>
      Buffer.concat([sshString('ssh-ed25519'), sshString(cryptoSign(null, sshsigSignedData(message), privateKey))]).toString('base64'),
  };
}

// ---- ssh-agent (draft-miller-ssh-agent) --------------------------------------------------------------

const AGENTC_REQUEST_IDENTITIES = 11;
const AGENT_IDENTITIES_ANSWER = 12;
const AGENTC_SIGN_REQUEST = 13;
const AGENT_SIGN_RESPONSE = 14;

function agentRequest(socketPath: string, type: number, payload: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(socketPath);
    const body = Buffer.concat([Buffer.from([type]), payload]);
    let buf = Buffer.alloc(0);
    sock.once('connect', () => sock.write(Buffer.concat([u32(body.length), body])));
    sock.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      if (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        sock.end();
        resolve(buf.subarray(4, 4 + buf.readUInt32BE(0)));
      }
    });
    sock.once('error', (err) => reject(new SnapbackError('config-invalid', `cannot talk to ssh-agent at ${socketPath}: ${err.message}`)));
    sock.setTimeout(10_000, () => {
      sock.destroy();
      reject(new SnapbackError('config-invalid', `ssh-agent at ${socketPath} did not answer`));
    });
  });
}

/** The ssh-ed25519 identities an ssh-agent holds. */
export async function agentIdentities(socketPath: string): Promise<PublicKey[]> {
  const reply = await agentRequest(socketPath, AGENTC_REQUEST_IDENTITIES, Buffer.alloc(0));
  if (reply[0] !== AGENT_IDENTITIES_ANSWER) throw new SnapbackError('config-invalid', 'ssh-agent refused to list its keys');
  const r = new Reader(reply.subarray(1));
  const n = r.u32();
  const out: PublicKey[] = [];
  for (let i = 0; i < n; i++) {
    const blob = r.bytes();
    const comment = r.string();
    try {
      out.push(publicKeyFromBlob(blob, comment));
    } catch {
      // other key types: not usable here, skip
    }
  }
  return out;
}

export function agentSigner(socketPath: string, publicKey: PublicKey): Signer {
  return {
    publicKey,
    source: `ssh-agent (${publicKey.fingerprint})`,
    async sign(message) {
      const reply = await agentRequest(socketPath, AGENTC_SIGN_REQUEST, Buffer.concat([sshString(publicKey.blob), sshString(sshsigSignedData(message)), u32(0)]));
      if (reply[0] !== AGENT_SIGN_RESPONSE) throw new SnapbackError('unauthorized', `ssh-agent refused to sign with ${publicKey.fingerprint}`);
      return new Reader(reply.subarray(1)).bytes().toString('base64');
    },
  };
}

// ---- OpenSSH patterns --------------------------------------------------------------------------------

/**
 * OpenSSH's wildcard match (`match_pattern`): `*` is any run of characters, `?` exactly one, the rest
 * literal; the whole of `text` must match. Case-insensitive, as sshd and ssh compare host names.
 */
export function matchWildcard(text: string, pattern: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`, 'is').test(text);
}
