// How events read, in the page and in the downloaded transcript.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { GetTranscriptResponse } from "../build/gen/chat/v1/customer_service_pb";
import {
  ParticipantKind,
  Visibility,
  type Attachment,
  type ConversationEvent,
  type Participant,
} from "../build/gen/chat/v1/resources_pb";

export const who = (p: Participant | undefined) =>
  p?.kind === ParticipantKind.CUSTOMER ? "You" : p?.displayName || "An agent";

export function size(bytes: bigint): string {
  const n = Number(bytes);
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

const fileList = (atts: Attachment[]) => atts.map((a) => `${a.fileName} (${size(a.sizeBytes)})`).join(", ");

/** One line for an event that is not a message or menu; "" for events the customer has no use for. */
export function notice(ev: ConversationEvent): string {
  const k = ev.kind;
  switch (k.case) {
    case "chatStarted":
      return `You started a chat about ${k.value.queue?.displayName ?? "your question"}.`;
    case "participantJoined":
      // The customer's own joining is the chat starting, said already.
      return k.value.participant?.kind === ParticipantKind.AGENT ? `${who(k.value.participant)} joined the chat.` : "";
    case "participantLeft":
      return `${who(k.value.participant)} left the chat.`;
    case "optionChosen":
      return `${who(k.value.chooser)} chose “${k.value.label}”.`;
    case "chatEnded":
      return k.value.endedBy?.kind === ParticipantKind.CUSTOMER ? "You ended the chat." : `${who(k.value.endedBy)} ended the chat.`;
    case "chatClosed":
      return "The chat is closed.";
    default:
      return "";
  }
}

/** Private (agents-only) events never reach customers; this page would not show one even if it did. */
export const visible = (ev: ConversationEvent) => ev.visibility !== Visibility.AGENTS_ONLY;

function line(ev: ConversationEvent): string {
  const k = ev.kind;
  if (k.case === "message") {
    const files = k.value.attachments.length ? ` [files: ${fileList(k.value.attachments)}]` : "";
    return `${who(k.value.sender)}: ${k.value.text}${files}`;
  }
  if (k.case === "offerMenu") {
    return `${who(k.value.sender)} asked: ${k.value.prompt} (${k.value.options.map((o) => o.label).join(" / ")})`;
  }
  return notice(ev);
}

const stamp = (ev: ConversationEvent) => (ev.createTime ? timestampDate(ev.createTime).toLocaleString() : "");

/** The transcript as a plain-text file. */
export function transcriptText(t: GetTranscriptResponse): string {
  const conv = t.conversation;
  const lines = [
    `Chat transcript: ${conv?.queue?.displayName ?? ""}`,
    `Conversation ${conv?.conversationId ?? ""}`,
    "",
    ...t.events.filter(visible).map((ev) => [stamp(ev), line(ev)]).filter(([, text]) => text).map(([at, text]) => `[${at}] ${text}`),
  ];
  return lines.join("\n") + "\n";
}
