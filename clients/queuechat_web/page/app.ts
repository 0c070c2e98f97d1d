// The customer's chat page: pick a queue, chat, answer menus, send files, end, keep the transcript.
import type { CustomerServiceStreamConversationResponse } from "../build/gen/chat/v1/customer_service_pb";
import { ParticipantKind, type Attachment, type ConversationEvent, type OfferMenu } from "../build/gen/chat/v1/resources_pb";
import { backoff, client, describe, isFinal, loadSession, opts, retrying, saveSession, type Failure, type Session } from "./api";
import { notice, size, transcriptText, visible, who } from "./transcript";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { refusal, upload } from "./uploads";

// No message or heartbeat (the server sends one every 15 s) for this long: the connection is dead.
const SILENCE_MS = 45_000;

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const ui = {
  startForm: $<HTMLFormElement>("start"),
  identity: $("identity"),
  queue: $<HTMLSelectElement>("queue"),
  name: $<HTMLInputElement>("name"),
  startButton: $<HTMLButtonElement>("start-button"),
  startError: $("start-error"),
  chat: $("chat"),
  status: $("status"),
  connection: $("connection"),
  scroller: $("scroller"),
  log: $("log"),
  outbox: $("outbox"),
  ended: $("ended"),
  rating: $<HTMLFormElement>("rating"),
  stars: $("stars"),
  ratingComment: $<HTMLTextAreaElement>("rating-comment"),
  ratingDetails: $("rating-details"),
  ratingSend: $<HTMLButtonElement>("rating-send"),
  ratingError: $("rating-error"),
  ratingDone: $("rating-done"),
  typing: $("typing"),
  endedText: $("ended-text"),
  composer: $<HTMLFormElement>("composer"),
  files: $("files"),
  composerError: $("composer-error"),
  fileInput: $<HTMLInputElement>("file-input"),
  text: $<HTMLTextAreaElement>("text"),
  end: $<HTMLButtonElement>("end"),
  transcript: $<HTMLButtonElement>("transcript"),
  confirmEnd: $<HTMLDialogElement>("confirm-end"),
};

type PendingFile = { file: File; item: HTMLLIElement; attachmentId?: string; failed?: boolean };

let session: Session | null = null;
let identityToken = ""; // from the hosting site, in the URL fragment; sent to the server only in StartChat
let cursor = 0n; // the last seq seen, from events and heartbeats: the stream resumes after it
let ended = false;
let stream: AbortController | null = null;
const agents = new Map<string, string>(); // agents in the chat now: id -> name
const menus = new Map<string, HTMLElement>(); // menu id -> its option buttons
const sending = new Map<bigint, HTMLElement>(); // seq of a sent message -> its outbox entry, until the stream shows it
let files: PendingFile[] = [];
const typing = new Map<string, { name: string; timer: ReturnType<typeof setTimeout> }>(); // agents composing now
let answered = false; // an agent has been in the chat: it can be rated once it ends
let lastSeq = 0n; // the last event shown: how far the customer has read while the page is in view
let readSent = 0n; // the cursor the server has (or is being sent)
let agentsRead = 0n; // how far the agents have read (the highest of their cursors, public events only)
let score = 0; // the rating chosen, 1 to 5
let ratingRequest = ""; // the rating's request id: a retry is the same rating
let typingSaid = 0; // when the page last told the server the customer is typing (ms), 0 = not typing

// The server's rule: a typing signal at most every 2 s while composing; it shows for 5 s unless renewed.
const TYPING_EVERY_MS = 2_000;
const TYPING_SHOWN_MS = 6_000; // the longest an indicator stays without a renewal, whatever the clocks say

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: { class?: string; text?: string; attrs?: Record<string, string> } = {},
  ...children: Node[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (props.class) node.className = props.class;
  if (props.text !== undefined) node.textContent = props.text;
  for (const [k, v] of Object.entries(props.attrs ?? {})) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function save(blob: Blob, fileName: string): void {
  const a = el("a", { attrs: { href: URL.createObjectURL(blob), download: fileName } });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000); // after the browser has taken the file
}

// --- starting -------------------------------------------------------------------------------

async function showStart(error = ""): Promise<void> {
  ui.chat.hidden = ui.end.hidden = ui.transcript.hidden = true;
  ui.startForm.hidden = false;
  ui.startError.textContent = error;
  if (identityToken) {
    ui.identity.hidden = false;
    ui.identity.textContent = "You are signed in on our website: the agent will see your verified details.";
    ui.name.hidden = ui.name.labels![0].hidden = true;
  }
  if (!ui.queue.options.length) {
    const { queues } = await retrying(
      () => client.listQueues({}, { timeoutMs: 10_000 }),
      (f) => (ui.startError.textContent = `${f.message} Retrying…`),
    );
    ui.startError.textContent = error;
    ui.queue.replaceChildren(...queues.map((q) => el("option", { text: q.displayName, attrs: { value: q.queueId } })));
    ui.startButton.disabled = false; // not before there is a queue to choose
  }
  ui.queue.focus();
}

async function startChat(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  ui.startButton.disabled = true;
  const requestId = crypto.randomUUID(); // a retry returns the same chat
  const name = ui.name.value.trim();
  try {
    const res = await retrying(
      () =>
        client.startChat(
          { queueId: ui.queue.value, requestId, variables: name ? { name } : {}, identityToken },
          { timeoutMs: 20_000 },
        ),
      (f) => (ui.startError.textContent = `${f.message} Retrying…`),
    );
    const s = { conversationId: res.conversation!.conversationId, token: res.customerToken };
    saveSession(s);
    openChat(s);
  } catch (e) {
    ui.startError.textContent = describe(e).message;
  } finally {
    ui.startButton.disabled = false;
  }
}

function openChat(s: Session): void {
  session = s;
  cursor = 0n;
  ended = false;
  agents.clear();
  menus.clear();
  for (const id of [...typing.keys()]) setTyping(id, "", 0);
  typingSaid = 0;
  answered = false;
  lastSeq = readSent = agentsRead = 0n;
  ui.rating.hidden = ui.ratingDone.hidden = true;
  ui.typing.hidden = false;
  sending.clear();
  files = [];
  ui.log.replaceChildren();
  ui.outbox.replaceChildren();
  ui.files.replaceChildren();
  ui.startForm.hidden = ui.ended.hidden = true;
  ui.chat.hidden = ui.end.hidden = ui.transcript.hidden = ui.composer.hidden = false;
  ui.end.disabled = false;
  ui.status.textContent = "Waiting for an agent…";
  ui.text.focus();
  void follow(s);
}

// --- the conversation stream ------------------------------------------------------------------

/** Follow the conversation until it ends, resuming after `cursor` whenever the connection breaks. */
async function follow(s: Session): Promise<void> {
  for (let attempt = 0; session === s && !ended; ) {
    const abort = new AbortController();
    stream = abort;
    let silence = setTimeout(() => abort.abort(), SILENCE_MS);
    try {
      const req = { conversationId: s.conversationId, afterSeq: cursor };
      for await (const res of client.streamConversation(req, { headers: opts(s).headers, signal: abort.signal })) {
        clearTimeout(silence);
        silence = setTimeout(() => abort.abort(), SILENCE_MS);
        attempt = 0;
        ui.connection.hidden = true;
        receive(res);
      }
    } catch (e) {
      if (isFinal(e) && session === s) {
        // The chat is gone or the token is no longer good: nothing to resume.
        saveSession(null);
        session = null;
        void showStart(describe(e).message);
        return;
      }
    } finally {
      clearTimeout(silence);
    }
    if (session !== s || ended) return;
    ui.connection.hidden = false;
    await backoff(attempt++);
  }
}

function receive(res: CustomerServiceStreamConversationResponse): void {
  const k = res.kind;
  if (k.case === "heartbeat") {
    if (k.value.latestSeq > cursor) cursor = k.value.latestSeq;
  } else if (k.case === "typing") {
    const p = k.value.participant;
    if (p?.kind !== ParticipantKind.AGENT) return;
    // Until expire_time (measured on this machine's clock, within bounds), a newer indicator, or a stop.
    const left = k.value.expireTime ? timestampDate(k.value.expireTime).getTime() - Date.now() : TYPING_SHOWN_MS;
    setTyping(p.agentId, who(p), k.value.typing ? Math.min(Math.max(left, 1_000), TYPING_SHOWN_MS) : 0);
  } else if (k.case === "readCursor") {
    if (k.value.participant?.kind === ParticipantKind.AGENT && k.value.readSeq > agentsRead) {
      agentsRead = k.value.readSeq;
      showRead();
    }
  } else if (k.case === "queuePosition") {
    if (!agents.size) ui.status.textContent = `You are number ${k.value.position} in the queue.`;
  } else if (k.case === "event" && k.value.seq > cursor) {
    // Events come in seq order; a resumed stream never repeats one, and this check makes sure.
    cursor = k.value.seq;
    if (visible(k.value)) {
      show(k.value);
      lastSeq = k.value.seq;
      markRead();
    }
  }
}

function show(ev: ConversationEvent): void {
  const k = ev.kind;
  // A refusal above the input (a file, a menu choice) is about the moment it happened: once someone else moves
  // the conversation on, it goes. (Not for the customer's own lines coming back: they may predate it.)
  const own =
    (k.case === "message" && k.value.sender?.kind === ParticipantKind.CUSTOMER) ||
    (k.case === "optionChosen" && k.value.chooser?.kind === ParticipantKind.CUSTOMER);
  if (!own) ui.composerError.textContent = "";
  switch (k.case) {
    case "message":
      // An agent's message ends their typing.
      if (k.value.sender?.kind === ParticipantKind.AGENT) setTyping(k.value.sender.agentId, "", 0);
      append(messageItem(k.value.sender?.kind === ParticipantKind.CUSTOMER, who(k.value.sender), k.value.text, k.value.attachments, ev));
      if (ev.seq <= agentsRead) showRead();
      break;
    case "offerMenu":
      append(menuItem(k.value, ev));
      break;
    case "participantJoined":
    case "participantLeft": {
      const p = k.value.participant!;
      if (p.kind === ParticipantKind.AGENT) {
        if (k.case === "participantJoined") {
          agents.set(p.agentId, p.displayName);
          answered = true;
        }
        else agents.delete(p.agentId);
        ui.status.textContent = agents.size ? `You are chatting with ${[...agents.values()].join(", ")}.` : "Waiting for an agent…";
      }
      const text = notice(ev);
      if (text) append(el("li", { class: "notice", text }));
      break;
    }
    case "optionChosen":
      for (const b of menus.get(k.value.menuId)?.querySelectorAll("button") ?? []) {
        b.disabled = true;
        if (b.dataset.option === k.value.optionId) b.setAttribute("aria-pressed", "true");
      }
      append(el("li", { class: "notice", text: notice(ev) }));
      break;
    case "chatEnded":
    case "chatClosed":
      append(el("li", { class: "notice", text: notice(ev) }));
      finish(notice(ev));
      break;
    default: {
      const text = notice(ev);
      if (text) append(el("li", { class: "notice", text }));
    }
  }
  sending.get(ev.seq)?.remove();
  sending.delete(ev.seq);
}

/** Show that agentId is composing for ms (0: no longer). */
function setTyping(agentId: string, name: string, ms: number): void {
  clearTimeout(typing.get(agentId)?.timer);
  typing.delete(agentId);
  if (ms > 0) typing.set(agentId, { name, timer: setTimeout(() => setTyping(agentId, name, 0), ms) });
  const names = [...typing.values()].map((t) => t.name);
  ui.typing.textContent = !names.length ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.join(" and ")} are typing…`;
}

/** Tell the agents whether the customer is composing: at most every 2 s while typing, once when stopping. */
function composing(): void {
  const s = session;
  if (!s || ended) return;
  const now = Date.now();
  const typingNow = ui.text.value.trim() !== "";
  if (typingNow && now - typingSaid < TYPING_EVERY_MS) return;
  if (!typingNow && !typingSaid) return;
  typingSaid = typingNow ? now : 0;
  // Best effort: a lost or refused signal (e.g. over the rate) only means a missing "typing…".
  client.setTyping({ conversationId: s.conversationId, typing: typingNow }, opts(s, 5_000)).catch(() => undefined);
}

function append(item: HTMLElement): void {
  ui.log.append(item);
  toEnd();
}

// Whether the conversation is scrolled to its end: it then stays there when the area around it changes
// (the ended panel, the file list or an error above the input take room from the bottom).
let atEnd = true;

function toEnd(): void {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  atEnd = true;
}

/** The sender's line of a message: the name and, for a stored event, the time it was sent. */
function whoLine(sender: string, ev?: ConversationEvent): HTMLElement {
  const line = el("span", { class: "who", text: sender });
  if (ev?.createTime) {
    const at = timestampDate(ev.createTime);
    const time = el("time", { class: "time", text: at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), attrs: { datetime: at.toISOString(), title: at.toLocaleString() } });
    line.append(" · ", time);
  }
  return line;
}

function messageItem(mine: boolean, sender: string, text: string, attachments: Attachment[] = [], ev?: ConversationEvent): HTMLLIElement {
  const item = el("li", { class: mine ? "msg mine" : "msg" }, whoLine(sender, ev));
  if (ev) item.dataset.seq = String(ev.seq);
  if (text) item.append(el("p", { class: "text", text }));
  if (attachments.length) {
    item.append(
      el("ul", { class: "attachments" }, ...attachments.map((a) => {
        const button = el("button", { text: `${a.fileName} (${size(a.sizeBytes)})`, attrs: { type: "button", "aria-label": `Download ${a.fileName}` } });
        button.onclick = () => void download(a, button);
        return el("li", {}, button);
      })),
    );
  }
  return item;
}

function menuItem(menu: OfferMenu, ev: ConversationEvent): HTMLLIElement {
  const options = el("div", { class: "options", attrs: { role: "group", "aria-label": menu.prompt } });
  for (const o of menu.options) {
    const b = el("button", { text: o.label, attrs: { type: "button" } });
    b.dataset.option = o.optionId;
    b.onclick = () => void choose(menu.menuId, o.optionId, options);
    options.append(b);
  }
  menus.set(menu.menuId, options);
  return el("li", { class: "msg menu" }, whoLine(who(menu.sender), ev), el("p", { class: "text", text: menu.prompt }), options);
}

// --- read receipts -------------------------------------------------------------------------

/** "Read" under the customer's last message the agents have read. */
function showRead(): void {
  const mine = [...ui.log.querySelectorAll<HTMLElement>(".msg.mine[data-seq]")];
  const last = mine.reverse().find((m) => BigInt(m.dataset.seq!) <= agentsRead);
  const mark = ui.log.querySelector(".msg .read");
  if (last && mark?.parentElement === last) return;
  mark?.remove();
  last?.append(el("span", { class: "read", text: "Read" }));
}

let reading = false;

/** Tell the server how far the customer has read: what the page shows while it is in view, a moment after
 * the last event (a burst is one call), one call at a time. Best effort. */
function markRead(): void {
  const s = session;
  if (!s || reading || lastSeq <= readSent || document.visibilityState !== "visible") return;
  reading = true;
  setTimeout(() => {
    const upTo = lastSeq;
    client
      .markRead({ conversationId: s.conversationId, upToSeq: upTo }, opts(s, 10_000))
      .then((res) => {
        if ((res.readCursor?.readSeq ?? 0n) > readSent) readSent = res.readCursor!.readSeq;
      })
      .catch(() => undefined)
      .finally(() => {
        reading = false;
        if (session === s && lastSeq > readSent && lastSeq > upTo) markRead();
      });
  }, 300);
}

// --- rating --------------------------------------------------------------------------------

function setupRating(): void {
  ui.stars.replaceChildren(
    ...[1, 2, 3, 4, 5].map((n) => {
      const b = el("button", { text: "★", attrs: { type: "button", "aria-label": `${n} of 5`, "aria-pressed": "false" } });
      b.onclick = () => chooseScore(n);
      return b;
    }),
  );
  ui.rating.addEventListener("submit", (e) => void sendRating(e));
}

function chooseScore(n: number): void {
  score = n;
  ui.stars.querySelectorAll("button").forEach((b, i) => {
    b.classList.toggle("on", i < n);
    b.setAttribute("aria-pressed", String(i + 1 === n));
  });
  ui.ratingSend.disabled = !n;
  ui.ratingDetails.hidden = !n;
}

function rated(text: string): void {
  ui.rating.hidden = true;
  ui.ratingDone.hidden = false;
  ui.ratingDone.textContent = text;
}

/** After the end: the rating form, unless nobody answered the chat or it has been rated already. */
async function offerRating(s: Session): Promise<void> {
  score = 0;
  ratingRequest = crypto.randomUUID();
  chooseScore(0);
  ui.ratingSend.disabled = true;
  ui.ratingComment.value = "";
  ui.ratingError.textContent = "";
  ui.ratingDone.hidden = true;
  ui.rating.hidden = !answered;
  if (!answered) return;
  try {
    const { conversation } = await client.getConversation({ conversationId: s.conversationId }, opts(s));
    if (session === s && conversation?.rating) rated(`You rated this chat ${conversation.rating.score} of 5. Thank you!`);
  } catch {
    // The form stays: the server says if it is too late.
  }
}

async function sendRating(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  const s = session;
  if (!s || !score) return;
  ui.ratingSend.disabled = true;
  ui.ratingError.textContent = "";
  try {
    const req = { conversationId: s.conversationId, requestId: ratingRequest, score, comment: ui.ratingComment.value.trim() };
    const { rating } = await retrying(() => client.rateConversation(req, opts(s)));
    rated(`Thank you for your rating (${rating?.score ?? score} of 5).`);
  } catch (e) {
    const f = describe(e);
    if (f.reason === "ALREADY_RATED") rated("You have rated this chat already. Thank you!");
    else if (f.reason === "RATING_WINDOW_CLOSED" || f.reason === "NOT_ANSWERED") rated(f.message);
    else {
      ui.ratingError.textContent = f.message;
      ui.ratingSend.disabled = false;
    }
  }
}

function finish(text: string): void {
  ended = true;
  stream?.abort();
  ui.end.hidden = ui.composer.hidden = ui.connection.hidden = true;
  ui.ended.hidden = false;
  ui.endedText.textContent = `${text} You can keep a copy of the conversation.`;
  ui.status.textContent = "";
  ui.composerError.textContent = "";
  for (const id of [...typing.keys()]) setTyping(id, "", 0);
  ui.typing.hidden = true;
  for (const b of ui.log.querySelectorAll<HTMLButtonElement>(".options button")) b.disabled = true;
  // Once: a reload replays chat_ended and chat_closed, and a form being filled in must not start over.
  if (session && ui.rating.hidden && ui.ratingDone.hidden) void offerRating(session);
  // The panel takes the composer's place and more: the last line and its file buttons stay in view.
  $("ended-transcript").focus({ preventScroll: true });
  toEnd();
}

// --- actions --------------------------------------------------------------------------------

async function choose(menuId: string, optionId: string, options: HTMLElement): Promise<void> {
  const s = session!;
  const buttons = options.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  try {
    await retrying(() => client.chooseOption({ conversationId: s.conversationId, menuId, optionId }, opts(s)));
  } catch (e) {
    const f = describe(e);
    if (f.reason !== "OPTION_ALREADY_CHOSEN") buttons.forEach((b) => (b.disabled = false));
    ui.composerError.textContent = f.message;
  }
}

async function sendMessage(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  const s = session;
  if (!s || ended) return;
  const text = ui.text.value.trim();
  if (files.some((f) => !f.attachmentId && !f.failed)) {
    ui.composerError.textContent = "Wait until the files have finished uploading.";
    return;
  }
  const ready = files.filter((f) => f.attachmentId);
  if (!text && !ready.length) return;
  ui.text.value = "";
  composing(); // the input is empty: no longer typing
  ui.composerError.textContent = "";
  files = [];
  ui.files.replaceChildren();
  // Shown until the stream brings the message back in its place in the conversation.
  const state = el("span", { class: "state", text: "Sending…" });
  const item = messageItem(true, "You", text);
  if (ready.length) item.append(el("p", { class: "text", text: ready.map((f) => f.file.name).join(", ") }));
  item.append(state);
  ui.outbox.append(item);
  toEnd();
  const requestId = crypto.randomUUID(); // the same id on every retry: stored once
  const attachmentIds = ready.map((f) => f.attachmentId!);
  try {
    const res = await retrying(
      () => client.sendMessage({ conversationId: s.conversationId, requestId, text, attachmentIds }, opts(s)),
      () => (state.textContent = "Not sent yet, retrying…"),
    );
    const seq = res.event!.seq;
    if (seq <= cursor) item.remove();
    else sending.set(seq, item);
  } catch (e) {
    item.classList.add("failed");
    state.textContent = `Not sent: ${describe(e).message}`;
  }
}

function addFiles(): void {
  for (const file of ui.fileInput.files ?? []) {
    const why = refusal(file, files.length);
    if (why) {
      ui.composerError.textContent = why;
      continue;
    }
    ui.composerError.textContent = "";
    const state = el("span", { class: "state", text: "Uploading…" });
    const progress = el("progress", { attrs: { max: String(file.size), value: "0", "aria-label": `Upload of ${file.name}` } });
    const remove = el("button", { text: "×", class: "icon small", attrs: { type: "button", "aria-label": `Remove ${file.name}` } });
    const item = el("li", { class: "file" }, el("span", { class: "name", text: file.name }), progress, state, remove);
    const pending: PendingFile = { file, item };
    remove.onclick = () => {
      files = files.filter((f) => f !== pending);
      item.remove();
      ui.text.focus();
    };
    files.push(pending);
    ui.files.append(item);
    upload(session!, file, (sent) => (progress.value = sent), (f: Failure) => (state.textContent = `${f.message} Retrying…`))
      .then((id) => {
        pending.attachmentId = id;
        item.classList.add("ready");
        state.textContent = "Ready";
      })
      .catch((e) => {
        const f = describe(e);
        pending.failed = true;
        item.classList.add("failed");
        item.dataset.reason = f.reason;
        state.textContent = `Refused: ${f.message}`;
      });
  }
  ui.fileInput.value = "";
}

async function download(att: Attachment, button: HTMLButtonElement): Promise<void> {
  const s = session!;
  button.disabled = true;
  // Blob takes ArrayBuffer-backed bytes; protobuf-es types bytes fields as any Uint8Array (never shared).
  const parts: Uint8Array<ArrayBuffer>[] = [];
  let received = 0;
  // Saved under the name and type the server gives now: its extension matches the content
  // (text sent as page.html is page.txt), whatever an older message said.
  let meta = att;
  try {
    // A broken download resumes from the bytes already here.
    await retrying(async () => {
      const req = { conversationId: s.conversationId, attachmentId: att.attachmentId, offset: BigInt(received) };
      for await (const r of client.downloadAttachment(req, opts(s, 300_000))) {
        if (r.kind.case === "attachment") {
          meta = r.kind.value;
        } else if (r.kind.case === "chunk") {
          parts.push(r.kind.value.data as Uint8Array<ArrayBuffer>);
          received += r.kind.value.data.length;
        }
      }
    });
    save(new Blob(parts, { type: meta.contentType }), meta.fileName || att.fileName);
  } catch (e) {
    ui.composerError.textContent = `Could not download “${att.fileName}”: ${describe(e).message}`;
  } finally {
    button.disabled = false;
  }
}

async function downloadTranscript(): Promise<void> {
  const s = session!;
  try {
    const t = await retrying(() => client.getTranscript({ conversationId: s.conversationId }, opts(s)));
    save(new Blob([transcriptText(t)], { type: "text/plain;charset=utf-8" }), "chat-transcript.txt");
  } catch (e) {
    ui.status.textContent = `Could not get the transcript: ${describe(e).message}`;
  }
}

async function endChat(): Promise<void> {
  const s = session!;
  ui.end.disabled = true;
  try {
    // The stream then brings chat_ended, which closes the page's side.
    await retrying(() => client.endChat({ conversationId: s.conversationId }, opts(s)));
  } catch (e) {
    ui.end.disabled = false;
    ui.composerError.textContent = describe(e).message;
  }
}

// --- wiring ---------------------------------------------------------------------------------

function main(): void {
  // The hosting site may sign the customer in: #identity_token=JWT. Read it, then drop it from the address bar.
  identityToken = new URLSearchParams(location.hash.slice(1)).get("identity_token") ?? "";
  if (identityToken) history.replaceState(null, "", location.pathname + location.search);

  ui.startForm.addEventListener("submit", (e) => void startChat(e));
  ui.composer.addEventListener("submit", (e) => void sendMessage(e));
  ui.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  $("attach").addEventListener("click", () => ui.fileInput.click());
  ui.fileInput.addEventListener("change", addFiles);
  ui.text.addEventListener("input", composing);
  setupRating();
  // Read while the page is in view: coming back to it reads what came meanwhile.
  document.addEventListener("visibilitychange", markRead);
  ui.transcript.addEventListener("click", () => void downloadTranscript());
  $("ended-transcript").addEventListener("click", () => void downloadTranscript());
  ui.end.addEventListener("click", () => {
    ui.composerError.textContent = "";
    ui.confirmEnd.showModal();
  });
  ui.scroller.addEventListener("scroll", () => {
    atEnd = ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < 4;
  });
  new ResizeObserver(() => {
    if (atEnd) ui.scroller.scrollTop = ui.scroller.scrollHeight;
  }).observe(ui.scroller);
  ui.confirmEnd.addEventListener("close", () => {
    if (ui.confirmEnd.returnValue === "end") void endChat();
    else ui.text.focus();
    ui.confirmEnd.returnValue = "";
  });
  $("new-chat").addEventListener("click", () => {
    saveSession(null);
    session = null;
    void showStart();
  });
  // The browser knows the network is gone: stop waiting on a dead stream.
  addEventListener("offline", () => stream?.abort());

  const saved = loadSession();
  if (saved) openChat(saved);
  else void showStart();
}

main();
