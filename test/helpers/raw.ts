// A hand-driven protocol client for attacking the agent: it does the handshake step by step, can
// sign or not, records what it sends, and exposes every frame it gets back.

import { randomBytes } from 'node:crypto';
import WebSocket from 'ws';
import { SUBPROTOCOL, commandPayload, transcript, type CommandBody } from '../../shared/protocol.ts';
import { formatPublicKey, keyFileSigner, type Signer } from '../../shared/ssh.ts';

export class RawClient {
  readonly ws: WebSocket;
  readonly messages: any[] = [];
  agentNonce = '';
  readonly controllerNonce = randomBytes(32).toString('base64url');
  closeCode: number | undefined;
  private seq = 0;
  private waiters = new Set<() => void>();
  readonly closed: Promise<number>;

  /** `localAddress`: connect from another loopback address (127.0.0.2), for from= */
  constructor(port: number, protocol: string | undefined = SUBPROTOCOL, localAddress?: string) {
    this.ws = new WebSocket(`ws://127.0.0.1:${port}`, protocol ? [protocol] : [], { perMessageDeflate: false, maxPayload: 1 << 20, ...(localAddress ? { localAddress } : {}) });
    this.ws.on('message', (d) => {
      const m = JSON.parse(d.toString());
      if (m.type === 'challenge') this.agentNonce = m.nonce;
      this.messages.push(m);
      for (const w of this.waiters) w();
    });
    this.ws.on('error', () => {});
    this.closed = new Promise((resolve) =>
      this.ws.on('close', (code) => {
        this.closeCode = code;
        for (const w of this.waiters) w();
        resolve(code);
      }),
    );
  }

  /** Resolves with the first message (past or future) matching `pred`, or undefined on close. */
  next(pred: (m: any) => boolean, timeoutMs = 15_000): Promise<any> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const hit = this.messages.find(pred);
        if (hit) {
          this.messages.splice(this.messages.indexOf(hit), 1);
          done();
          resolve(hit);
        } else if (this.closeCode !== undefined) {
          done();
          resolve(undefined);
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no matching message; got ${JSON.stringify(this.messages)}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  /** challenge → hello → welcome, as the given key. */
  async authenticate(keyPath: string): Promise<any> {
    await this.next((m) => m.type === 'challenge');
    const signer = keyFileSigner(keyPath);
    this.signer = signer;
    const key = formatPublicKey({ ...signer.publicKey, comment: '' });
    this.send({ type: 'hello', nonce: this.controllerNonce, key, sig: await signer.sign(transcript('client', this.agentNonce, this.controllerNonce, key)) });
    return this.next((m) => m.type === 'welcome' || m.type === 'error');
  }

  signer: Signer | undefined;

  /** A correctly signed command for this session (not sent). */
  async signed(cmd: CommandBody, seq = ++this.seq): Promise<Record<string, unknown>> {
    const body = { ...cmd, seq };
    return { ...body, sig: await this.signer!.sign(commandPayload(this.agentNonce, this.controllerNonce, body as never)) };
  }

  send(msg: unknown): void {
    this.ws.send(typeof msg === 'string' ? msg : JSON.stringify(msg));
  }

  close(): void {
    this.ws.close();
  }
}
