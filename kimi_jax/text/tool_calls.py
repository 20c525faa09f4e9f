"""Kimi's tool calls in generated text, read into the OpenAI API's ``tool_calls``.

Kimi K2 writes a turn's calls after its text as one section of marker tokens (ordinary tokens,
not special ones, so decoded text keeps them)::

    TEXT<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>
    ARGUMENTS<|tool_call_end|>...<|tool_calls_section_end|>

The call id is what the model wrote (``functions.NAME:INDEX``), which its chat template writes
back when the conversation continues; the name is the part between the last ``.`` and the ``:``
(the id itself when it has neither); the arguments are passed on as written (the API's arguments
are a JSON string the caller parses). :class:`ToolCallStream` does the same on text arriving
piece by piece: text before the section as it comes, each call once it is complete.
"""

from __future__ import annotations

import dataclasses

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENTS_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENTS_BEGIN, CALL_END)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def as_api(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call(raw: str) -> ToolCall:
    head, _, arguments = raw.partition(ARGUMENTS_BEGIN)
    call_id = head.strip()
    name = call_id.rpartition(".")[2].partition(":")[0] or call_id
    return ToolCall(call_id, name, arguments.strip())


class ToolCallStream:
    """Feed text as it is generated; get back the text to show and the calls completed so far."""

    def __init__(self):
        self._buffer = ""
        self._in_section = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        shown = ""
        if not self._in_section:
            at = self._buffer.find(SECTION_BEGIN)
            if at < 0:  # hold back an end that could be the start of the marker
                keep = next((n for n in range(min(len(self._buffer), len(SECTION_BEGIN) - 1), 0, -1)
                             if SECTION_BEGIN.startswith(self._buffer[-n:])), 0)  # fmt: skip
                shown, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                return shown, []
            shown, self._buffer, self._in_section = self._buffer[:at], self._buffer[at + len(SECTION_BEGIN) :], True
        made = []
        while (begin := self._buffer.find(CALL_BEGIN)) >= 0 and (end := self._buffer.find(CALL_END, begin)) >= 0:
            made.append(_call(self._buffer[begin + len(CALL_BEGIN) : end]))
            self._buffer = self._buffer[end + len(CALL_END) :]
        self.calls += made
        return shown, made

    def close(self) -> str:
        """The text still held back (a section never opened); an unfinished call is dropped."""
        rest, self._buffer = ("" if self._in_section else self._buffer), ""
        return rest


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text before the calls, the calls) of a whole generated turn."""
    stream = ToolCallStream()
    shown, calls = stream.feed(text)
    return shown + stream.close(), calls
