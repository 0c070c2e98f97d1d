// Attachments: the server's limits checked before anything is sent, then a resumable chunked upload.
import { client, opts, retrying, type Failure, type Session } from "./api";

export const MAX_FILES = 5;
export const MAX_BYTES = 20 * 1024 * 1024; // 20 MiB = 20,971,520 bytes, as the server allows
const CHUNK_BYTES = 1024 * 1024;

// What the server accepts (it judges the content; these are the types a browser names for such files).
const TYPES = new Set([
  "text/plain", "text/csv", "text/markdown", "text/tab-separated-values", "application/json", "application/x-ndjson",
  "application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff", "image/heic",
  "image/heif", "image/avif",
]);
// Browsers give some text files no type at all.
const TEXT_EXTENSIONS = new Set(["txt", "csv", "md", "tsv", "json", "ndjson", "log"]);

/** Why this file cannot be attached next to `pending` others, or "" when it can. */
export function refusal(file: File, pending: number): string {
  if (pending >= MAX_FILES) return `You can attach at most ${MAX_FILES} files to a message.`;
  if (file.size > MAX_BYTES) return `“${file.name}” is larger than 20 MiB.`;
  if (file.size === 0) return `“${file.name}” is empty.`;
  const ext = file.name.includes(".") ? file.name.split(".").pop()!.toLowerCase() : "";
  if (!TYPES.has(file.type) && !(file.type === "" && TEXT_EXTENSIONS.has(ext))) {
    return `“${file.name}” cannot be attached: text, PDF and images only.`;
  }
  return "";
}

async function sha256hex(file: Blob): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Upload a file: create, send 1 MiB chunks, complete with the SHA-256.
 * Resolves to the attachment id; a refusal by the server rejects with it.
 */
export async function upload(
  session: Session,
  file: File,
  progress: (sentBytes: number) => void,
  onRetry: (f: Failure) => void,
): Promise<string> {
  const conversationId = session.conversationId;
  const requestId = crypto.randomUUID(); // a retried CreateUpload is the same upload
  const digest = sha256hex(file);
  const contentType = TYPES.has(file.type) ? file.type : ""; // empty: the server takes it from the content
  const created = await retrying(
    () => client.createUpload({ conversationId, requestId, fileName: file.name, sizeBytes: BigInt(file.size), contentType }, opts(session)),
    onRetry,
  );
  const up = created.upload!;
  const step = up.maxChunkBytes || CHUNK_BYTES;
  let offset = Number(up.receivedBytes);
  while (offset < file.size) {
    const data = new Uint8Array(await file.slice(offset, offset + step).arrayBuffer());
    const at = BigInt(offset);
    // A retry re-sends the same chunk: the server accepts a repeat of the last one.
    const sent = await retrying(
      () => client.uploadChunk({ conversationId, uploadId: up.uploadId, offset: at, data }, opts(session, 60_000)),
      onRetry,
    );
    offset = Number(sent.receivedBytes);
    progress(offset);
  }
  const sha256 = await digest;
  try {
    const done = await retrying(() => client.completeUpload({ conversationId, uploadId: up.uploadId, sha256 }, opts(session)), onRetry);
    return done.upload!.attachment!.attachmentId;
  } catch (refused) {
    // A refused file would hold one of the five places until it expires: drop it now.
    await client.deleteUpload({ conversationId, uploadId: up.uploadId }, opts(session)).catch(() => undefined);
    throw refused;
  }
}
