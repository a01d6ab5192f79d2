/** HTTP over TCP or a Unix socket with node:http (no dependencies). */

import http from "node:http";
import https from "node:https";
import type { IncomingHttpHeaders, IncomingMessage } from "node:http";

export interface Target {
  socketPath?: string;
  https: boolean;
  hostname: string;
  port?: number;
  basePath: string;
  /** How errors name it: the URL, or `unix:<path>`. */
  where: string;
}

export const DEFAULT_URL = "http://127.0.0.1:7878";

export function makeTarget(url: string | undefined, socketPath: string | undefined): Target {
  if (url !== undefined && socketPath !== undefined) throw new TypeError("pass url or socketPath, not both");
  if (socketPath !== undefined) {
    if (!socketPath) throw new TypeError("socketPath must not be empty");
    return { socketPath, https: false, hostname: "localhost", basePath: "", where: `unix:${socketPath}` };
  }
  const text = (url ?? DEFAULT_URL).replace(/\/+$/, "");
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new TypeError(`url must look like http://host:port, got ${JSON.stringify(url)}`);
  }
  if ((u.protocol !== "http:" && u.protocol !== "https:") || !u.hostname) {
    throw new TypeError(`url must look like http://host:port, got ${JSON.stringify(url)}`);
  }
  return {
    https: u.protocol === "https:",
    hostname: u.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: u.port ? Number(u.port) : undefined,
    basePath: u.pathname.replace(/\/+$/, ""),
    where: text,
  };
}

/** No answer came: the connection failed, dropped, or timed out. */
export class TransportError extends Error {
  readonly code: string;
  readonly timeout: boolean;
  constructor(message: string, code: string, timeout = false, cause?: unknown) {
    super(message, cause !== undefined ? { cause } : undefined);
    this.name = "TransportError";
    this.code = code;
    this.timeout = timeout;
  }
}

export interface RawResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

function toTransportError(err: unknown): TransportError {
  if (err instanceof TransportError) return err;
  const e = err as NodeJS.ErrnoException;
  return new TransportError(e?.message || String(err), e?.code || "ECONNECTION", false, err);
}

export class Transport {
  private readonly agent: http.Agent;

  constructor(readonly target: Target) {
    const Agent = target.https ? https.Agent : http.Agent;
    // Idle pooled sockets are unref'd by node, so a client never keeps the process alive.
    this.agent = new Agent({ keepAlive: true, maxSockets: 256 });
  }

  private options(method: string, path: string, headers: Record<string, string>, agent: http.Agent | false): http.RequestOptions {
    const t = this.target;
    const o: http.RequestOptions = { method, path: t.basePath + path, headers, agent };
    if (t.socketPath !== undefined) o.socketPath = t.socketPath;
    else {
      o.hostname = t.hostname;
      if (t.port !== undefined) o.port = t.port;
    }
    return o;
  }

  private module() {
    return this.target.https ? https : http;
  }

  /** One request and its whole answer, within `timeoutMs` (0: no limit). */
  request(method: string, path: string, headers: Record<string, string>, body: Buffer | null, timeoutMs: number): Promise<RawResponse> {
    return new Promise<RawResponse>((resolve, reject) => {
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      const done = (err: unknown, res?: RawResponse) => {
        if (settled) return;
        settled = true;
        if (timer) clearTimeout(timer);
        if (err) reject(toTransportError(err));
        else resolve(res!);
      };
      const h = { ...headers };
      if (body) h["Content-Length"] = String(body.length);
      const req = this.module().request(this.options(method, path, h, this.agent), (res) => {
        const chunks: Buffer[] = [];
        let ended = false;
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          ended = true;
          done(null, { status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) });
        });
        res.on("error", (e) => done(e));
        res.on("close", () => {
          if (!ended) done(new TransportError("the connection closed before the answer was complete", "ECONNRESET"));
        });
      });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          const e = new TransportError(`no answer within ${timeoutMs} ms`, "ETIMEDOUT", true);
          req.destroy(e);
          done(e);
        }, timeoutMs);
      }
      req.on("error", (e) => done(e));
      req.end(body ?? undefined);
    });
  }

  /**
   * Opens a streaming GET (Server-Sent Events) on its own connection. Resolves
   * with the response once headers arrive (within `connectTimeoutMs`); the
   * connection counts as dropped after `idleTimeoutMs` without data (0: never).
   */
  open(
    path: string,
    headers: Record<string, string>,
    connectTimeoutMs: number,
    idleTimeoutMs: number,
  ): Promise<{ res: IncomingMessage; close: () => void; idleError: () => TransportError | null }> {
    return new Promise((resolve, reject) => {
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      // Destroying the request makes the response stream fail with a generic
      // "aborted"; the caller asks for this to report the timeout instead.
      let idle: TransportError | null = null;
      const req = this.module().request(this.options("GET", path, headers, false), (res) => {
        if (settled) return;
        settled = true;
        if (timer) clearTimeout(timer);
        if (idleTimeoutMs > 0) {
          req.setTimeout(idleTimeoutMs, () => {
            idle = new TransportError(`no data for ${idleTimeoutMs} ms`, "ETIMEDOUT", true);
            req.destroy(idle);
          });
        }
        resolve({ res, close: () => req.destroy(), idleError: () => idle });
      });
      if (connectTimeoutMs > 0) {
        timer = setTimeout(() => {
          const e = new TransportError(`no answer within ${connectTimeoutMs} ms`, "ETIMEDOUT", true);
          req.destroy(e);
          if (!settled) {
            settled = true;
            reject(e);
          }
        }, connectTimeoutMs);
      }
      req.on("error", (e) => {
        if (timer) clearTimeout(timer);
        if (!settled) {
          settled = true;
          reject(toTransportError(e));
        }
      });
      req.end();
    });
  }

  close(): void {
    this.agent.destroy();
  }
}

export { toTransportError };
