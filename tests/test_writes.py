"""TurnWriter and the channel end that uses it: frames of one loop turn leave in one write,
in order, and nothing sent before a close is lost."""

from __future__ import annotations

import asyncio

from recserve.server.channel_end import ChannelEnd
from recserve.server.writes import TurnWriter


class FakeTransport:
    """Records each write call (a list of frames) and whether it was closed."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.calls.append([data])

    def writelines(self, frames) -> None:
        assert not self.closed
        self.calls.append(list(frames))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_frames_of_one_turn_leave_in_one_write_in_order():
    async def main() -> list[list[bytes]]:
        writer, transport = TurnWriter(), FakeTransport()
        writer.transport = transport
        for frame in (b"a", b"b", b"c"):
            writer.write(frame)
        assert transport.calls == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        writer.write(b"d")  # a later turn: its own write
        await asyncio.sleep(0)
        return transport.calls

    assert asyncio.run(main()) == [[b"a", b"b", b"c"], [b"d"]]


def test_nothing_is_written_to_a_closing_or_missing_transport():
    async def main() -> tuple[list, list]:
        missing = TurnWriter()
        missing.write(b"lost")  # no transport yet: dropped, no error
        closing, transport = TurnWriter(), FakeTransport()
        closing.transport = transport
        closing.write(b"x")
        transport.closed = True  # closed before the turn ended
        await asyncio.sleep(0)
        closing.write(b"y")
        await asyncio.sleep(0)
        return missing._out, transport.calls

    assert asyncio.run(main()) == ([], [])


def test_channel_close_writes_what_was_queued_first():
    async def main() -> FakeTransport:
        end, transport = ChannelEnd(), FakeTransport()
        end.connection_made(transport)
        end.send_soon(b"last words")
        end.close()  # same turn: the frame must not wait for a turn that never writes
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(main())
    assert transport.calls == [[b"last words"]] and transport.closed


def test_channel_send_writes_at_once_after_what_was_queued():
    """Control messages (the models a worker may serve, drain) must be on their way
    before the sender goes on (it may log "ready" next), behind the queued replies."""
    async def main() -> list:
        end, transport = ChannelEnd(), FakeTransport()
        end.connection_made(transport)
        end.send_soon(b"reply 1")
        end.send_soon(b"reply 2")
        end.send(b"models")
        calls = list(transport.calls)
        await asyncio.sleep(0)  # the turn's flush finds nothing left
        return calls + transport.calls[len(calls):]

    assert asyncio.run(main()) == [[b"reply 1", b"reply 2", b"models"]]


def test_channel_send_with_nothing_queued_is_one_write_at_once():
    async def main() -> tuple[list, list]:
        end, transport = ChannelEnd(), FakeTransport()
        end.connection_made(transport)
        end.send(b"drain")
        at_once = list(transport.calls)
        await asyncio.sleep(0)
        return at_once, transport.calls

    at_once, after_the_turn = asyncio.run(main())
    assert at_once == after_the_turn == [[b"drain"]]
