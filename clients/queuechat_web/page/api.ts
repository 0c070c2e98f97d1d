// CustomerService over grpc-web (same origin as the page), the stored session, errors and retries.
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { CustomerService } from "../build/gen/chat/v1/customer_service_pb";
import { ErrorInfoSchema } from "../build/gen/google/rpc/error_details_pb";

export const client = createClient(CustomerService, createGrpcWebTransport({ baseUrl: location.origin }));

export type Session = { conversationId: string; token: string };

// sessionStorage: a reload of this tab resumes the chat; a new tab starts afresh.
const SESSION_KEY = "queuechat.session";

export function loadSession(): Session | null {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    return typeof s?.conversationId === "string" && typeof s?.token === "string" ? s : null;
  } catch {
    return null;
  }
}

export function saveSession(s: Session | null): void {
  if (s) sessionStorage.setItem(SESSION_KEY, JSON.stringify(s));
  else sessionStorage.removeItem(SESSION_KEY);
}

/** Call options: the customer token and a deadline (grpc-timeout) for unary calls. */
export function opts(session: Session, timeoutMs = 20_000) {
  return { headers: { authorization: `Bearer ${session.token}` }, timeoutMs };
}

export type Failure = { code: Code; message: string; reason: string };

/** A failed call as people read it, with the server's google.rpc.ErrorInfo reason. */
export function describe(e: unknown): Failure {
  const err = ConnectError.from(e);
  const reason = err.findDetails(ErrorInfoSchema)[0]?.reason ?? "";
  return { code: err.code, message: err.rawMessage || "Something went wrong.", reason };
}

// Refusals a retry cannot change. Anything else (network gone, server restarting, deadline) is retried;
// requests carry request ids or offsets, so a retry never doubles anything.
const FINAL = new Set([
  Code.InvalidArgument, Code.NotFound, Code.AlreadyExists, Code.PermissionDenied, Code.FailedPrecondition,
  Code.OutOfRange, Code.Unimplemented, Code.Unauthenticated, Code.ResourceExhausted,
]);

export const isFinal = (e: unknown) => FINAL.has(ConnectError.from(e).code);

/**
 * Wait before retry number `attempt`: 0.5 s doubling up to 10 s, cut short when the browser comes back online.
 * While the browser knows it is offline, wait for the network alone: retries then would fail anyway.
 */
export function backoff(attempt: number): Promise<void> {
  const ms = navigator.onLine ? Math.min(10_000, 500 * 2 ** attempt) * (0.75 + Math.random() / 2) : undefined;
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      removeEventListener("online", done);
      resolve();
    };
    const timer = ms === undefined ? undefined : setTimeout(done, ms);
    addEventListener("online", done);
  });
}

/** Run a call until it succeeds or is refused for good; onRetry tells the person what is going on. */
export async function retrying<T>(run: () => Promise<T>, onRetry?: (f: Failure) => void): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await run();
    } catch (e) {
      if (isFinal(e)) throw e;
      onRetry?.(describe(e));
      await backoff(attempt);
    }
  }
}
