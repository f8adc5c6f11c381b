// A WebSocket relay on loopback that sits between the controller and an agent and may read, drop,
// rewrite or invent messages: an on-path attacker on plain ws://, or a fleet host that relays the
// operator to another host.

import WebSocket, { WebSocketServer } from 'ws';
import { SUBPROTOCOL } from '../../shared/protocol.ts';

export interface RelayConnection {
  toController(msg: unknown): void;
  toAgent(msg: unknown): void;
}

export interface RelayHooks {
  /** a message from the controller: return it (changed or not) to pass it on, undefined to drop it */
  fromController?(msg: any, c: RelayConnection): any;
  /** a message from the agent, likewise */
  fromAgent?(msg: any, c: RelayConnection): any;
  /** a binary frame from the controller (a push's NAR stream): return it, changed or not, or undefined to drop it */
  fromControllerBinary?(data: Buffer, c: RelayConnection & { cut(): void }): Buffer | undefined;
}

export class Relay {
  port = 0;
  /** every message the controller sent, dropped or not */
  readonly seenFromController: any[] = [];
  /** bytes of binary frames the controller sent */
  binaryBytes = 0;
  private readonly wss: WebSocketServer;
  private readonly sockets = new Set<WebSocket>();

  constructor(agentPort: number, hooks: RelayHooks = {}) {
    this.wss = new WebSocketServer({ port: 0, host: '127.0.0.1', perMessageDeflate: false, handleProtocols: () => SUBPROTOCOL });
    this.wss.on('connection', (down) => {
      const up = new WebSocket(`ws://127.0.0.1:${agentPort}`, SUBPROTOCOL, { perMessageDeflate: false });
      this.sockets.add(down).add(up);
      const queued: string[] = [];
      const c: RelayConnection = {
        toController: (m) => down.readyState === down.OPEN && down.send(JSON.stringify(m)),
        toAgent: (m) => (up.readyState === up.OPEN ? up.send(JSON.stringify(m)) : queued.push(JSON.stringify(m))),
      };
      up.on('open', () => queued.splice(0).forEach((m) => up.send(m)));
      const queuedBinary: Buffer[] = [];
      up.on('open', () => queuedBinary.splice(0).forEach((m) => up.send(m)));
      down.on('message', (d, isBinary) => {
        if (isBinary) {
          this.binaryBytes += (d as Buffer).length;
          const out = hooks.fromControllerBinary ? hooks.fromControllerBinary(d as Buffer, { ...c, cut: () => (down.terminate(), up.terminate()) }) : (d as Buffer);
          if (out !== undefined) up.readyState === up.OPEN ? up.send(out) : queuedBinary.push(out);
          return;
        }
        const msg = JSON.parse(d.toString());
        this.seenFromController.push(msg);
        const out = hooks.fromController ? hooks.fromController(msg, c) : msg;
        if (out !== undefined) c.toAgent(out);
      });
      up.on('message', (d) => {
        const msg = JSON.parse(d.toString());
        const out = hooks.fromAgent ? hooks.fromAgent(msg, c) : msg;
        if (out !== undefined) c.toController(out);
      });
      for (const [a, b] of [
        [up, down],
        [down, up],
      ] as const) {
        a.on('error', () => {});
        a.on('close', () => b.terminate());
      }
    });
  }

  async listen(): Promise<this> {
    if (!this.wss.address()) await new Promise((r) => this.wss.once('listening', r));
    this.port = (this.wss.address() as { port: number }).port;
    return this;
  }

  close(): void {
    for (const s of this.sockets) s.terminate();
    this.wss.close();
  }
}
