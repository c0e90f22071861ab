// Structured logs: one JSON object per line on stderr, the fields the Python services write
// (ts in epoch seconds, level, service, logger, msg, then the call's own fields).

export type Level = "DEBUG" | "INFO" | "WARNING" | "ERROR";
export type Fields = Record<string, unknown>;

const RANK: Record<Level, number> = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40 };

export class Logger {
  constructor(
    readonly service: string,
    readonly name: string,
    private readonly minimum: Level = "INFO",
    private readonly write: (line: string) => void = (line) => process.stderr.write(line + "\n"),
  ) {}

  debug(msg: string, fields?: Fields): void {
    this.log("DEBUG", msg, fields);
  }

  info(msg: string, fields?: Fields): void {
    this.log("INFO", msg, fields);
  }

  warning(msg: string, fields?: Fields): void {
    this.log("WARNING", msg, fields);
  }

  error(msg: string, fields?: Fields, err?: unknown): void {
    const extra: Fields = { ...fields };
    if (err !== undefined) {
      extra["exc"] = err instanceof Error ? (err.stack ?? String(err)) : String(err);
    }
    this.log("ERROR", msg, extra);
  }

  log(level: Level, msg: string, fields?: Fields): void {
    if (RANK[level] < RANK[this.minimum]) {
      return;
    }
    const entry: Fields = {
      ts: Math.round(Date.now() * 1000) / 1e6,
      level,
      service: this.service,
      logger: this.name,
      msg,
    };
    for (const [key, value] of Object.entries(fields ?? {})) {
      entry[key] = plain(value);
    }
    this.write(JSON.stringify(entry));
  }
}

/** Numbers, booleans and null as they are; anything else as its string (as Python does). */
function plain(value: unknown): unknown {
  if (value === null || typeof value === "number" || typeof value === "boolean") {
    return value;
  }
  return typeof value === "string" ? value : JSON.stringify(value) ?? String(value);
}
