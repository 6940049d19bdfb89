"""LLaVA conversations -> token ids and labels (Vicuna-v1 or the tokenizer's chat template).

The conversation is rendered to one string together with the character spans of the assistant
replies (each including its end-of-turn token). The string is tokenized once with offsets, so the
ids are exactly the tokenizer's ids for the whole prompt (as LLaVA tokenizes), and a token is a
target iff it starts inside a reply span -- no per-tokenizer "minus two" arithmetic. Every
``<image>`` placeholder becomes ``num_image_tokens`` copies of ``image_token_id`` (docs/interfaces.md B).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadRecordError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
TEMPLATES = ("vicuna_v1", "chat_template")
# LLaVA-1.5's conv_vicuna_v1 system prompt.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Turn = tuple[str, str]  # (human message, assistant reply)


def parse_conversation(conversations: object) -> list[Turn]:
    """Validate LLaVA ``conversations`` and pair them into (human, gpt) turns.

    Raises BadRecordError("no_assistant") when there is no ``gpt`` message and
    BadRecordError("malformed") for anything but strictly alternating human/gpt messages with
    string values and no ``<image>`` inside a reply.
    """
    if not isinstance(conversations, list) or not conversations:
        raise BadRecordError("malformed", "conversations must be a non-empty list")
    roles, values = [], []
    for message in conversations:
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise BadRecordError("malformed", f"message without a string 'value': {message!r:.80}")
        if message.get("from") not in ("human", "gpt"):
            raise BadRecordError("malformed", f"'from' must be 'human' or 'gpt': {message!r:.80}")
        roles.append(message["from"])
        values.append(message["value"])
    if "gpt" not in roles:
        raise BadRecordError("no_assistant", "conversation has no 'gpt' message")
    if len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2):
        raise BadRecordError("malformed", f"roles must alternate human, gpt: {roles}")
    replies = values[1::2]
    if any(IMAGE_PLACEHOLDER in reply for reply in replies):
        raise BadRecordError("malformed", f"{IMAGE_PLACEHOLDER} inside an assistant reply")
    return list(zip(values[0::2], replies))


def render_vicuna_v1(turns: Sequence[Turn], system_prompt: str, eos_token: str):
    """``"{system} USER: {q} ASSISTANT: {a}</s>USER: ..."`` as LLaVA-1.5's conv_vicuna_v1.

    Returns (text, reply spans); a span covers " {a}{eos}" (the space before the reply belongs to
    the reply, so SentencePiece's "\u2581word" and byte-level " word" tokens start inside it).
    """
    parts, spans, length = [system_prompt, " "], [], len(system_prompt) + 1
    for human, reply in turns:
        prompt = f"USER: {human} ASSISTANT:"
        answer = f" {reply}{eos_token}"
        spans.append((length + len(prompt), length + len(prompt) + len(answer)))
        parts += [prompt, answer]
        length += len(prompt) + len(answer)
    return "".join(parts), spans


def render_chat_template(turns: Sequence[Turn], tokenizer, system_prompt: str | None):
    """Render through ``tokenizer.apply_chat_template`` (e.g. Llama-3's template).

    A reply's span is what rendering the conversation up to and including it adds after rendering
    it up to the preceding user message with the generation prompt: the reply plus the template's
    end-of-turn token. That needs a template whose renders extend each other; others raise.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    text, spans = "", []
    for human, reply in turns:
        messages.append({"role": "user", "content": human})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": reply})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(text) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat_template does not render conversations "
                             "incrementally; use template='vicuna_v1'")
        spans.append((len(prompt), len(full)))
        text = full
    return text, spans


def tokenize_rendered(text: str, spans: Sequence[tuple[int, int]], tokenizer, *,
                      image_token_id: int, num_image_tokens: int, add_bos: bool):
    """Tokenize ``text`` once (with offsets) and label the tokens that start inside ``spans``.

    Returns (input_ids, labels) as lists of ints; each ``<image>`` becomes ``num_image_tokens``
    image-token ids with ignored labels.
    """
    is_target = bytearray(len(text))
    for start, end in spans:
        is_target[start:end] = b"\x01" * (end - start)
    pieces = text.split(IMAGE_PLACEHOLDER)
    encoded = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, labels = [], []
    if add_bos:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    piece_start = 0
    for k, (piece, ids, offsets) in enumerate(zip(pieces, encoded["input_ids"],
                                                  encoded["offset_mapping"])):
        if k:
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        for token, (start, _) in zip(ids, offsets):
            input_ids.append(token)
            labels.append(token if is_target[piece_start + start] else IGNORE_INDEX)
        piece_start += len(piece) + len(IMAGE_PLACEHOLDER)
    return input_ids, labels


def truncate(input_ids: list[int], labels: list[int], max_length: int, image_token_id: int):
    """Cut to ``max_length`` tokens unless that would cut an image or leave no target.

    Both cases raise BadRecordError("too_long"): a partial image cannot be spliced (the model
    expects all of an image's features) and a sample without targets only wastes compute.
    """
    if len(input_ids) <= max_length:
        return input_ids, labels
    if image_token_id in input_ids[max_length:]:
        raise BadRecordError("too_long", f"{len(input_ids)} tokens > max_length={max_length} "
                                         "and an image does not fit")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecordError("too_long", f"no assistant token within max_length={max_length}")
    return input_ids, labels
