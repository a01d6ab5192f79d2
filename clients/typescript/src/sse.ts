/** An incremental parser of the `text/event-stream` format (WHATWG). */

export interface SSEMessage {
  id: string | null;
  event: string;
  data: string;
}

export class SSEParser {
  lastId: string | null;
  retryMs: number | null = null;
  private data: string[] = [];
  private event = "";
  private buffer = "";

  constructor(lastId: string | null = null) {
    this.lastId = lastId;
  }

  /** Feeds one line (without its terminator); returns a message at a blank line. */
  line(line: string): SSEMessage | null {
    if (line === "") {
      if (this.data.length === 0) {
        this.event = "";
        return null;
      }
      const msg = { id: this.lastId, event: this.event || "message", data: this.data.join("\n") };
      this.data = [];
      this.event = "";
      return msg;
    }
    if (line.startsWith(":")) return null; // a comment / keep-alive
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.data.push(value);
    else if (name === "event") this.event = value;
    else if (name === "id") {
      if (!value.includes("\0")) this.lastId = value;
    } else if (name === "retry") {
      if (/^\d+$/.test(value)) this.retryMs = Number(value);
    }
    return null;
  }

  /** Feeds a chunk of text; returns the messages it completes. Lines end at CRLF, LF or CR. */
  push(text: string): SSEMessage[] {
    this.buffer += text;
    const out: SSEMessage[] = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const c = this.buffer[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === this.buffer.length) break; // may be the first half of CRLF
      const msg = this.line(this.buffer.slice(start, i));
      if (msg) out.push(msg);
      if (c === "\r" && this.buffer[i + 1] === "\n") i++;
      start = i + 1;
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }
}
