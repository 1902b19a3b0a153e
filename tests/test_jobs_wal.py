"""WriteAheadLog on a task.Clock over files losing unsynced data: group sync, recovery, faults."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.interfaces import IEventJournal
from lpa.agent.wal import OsWalFiles, VolatileJournal, WriteAheadLog, synchronous_runner
from lpa.agent.walfiles import IWalFiles, decode_segment, encode_record, segment_name
from tests.fakes_wal import FakeWalFiles, StepRunner
from tests.logcheck import capture_events

DIRECTORY = "/state/journal"


class WalTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.files = FakeWalFiles()
        self.runner = StepRunner()
        self.durable: list[Any] = []
        self.log_events = capture_events(self)

    def open(self, files: FakeWalFiles | None = None, runner: object = None) -> WriteAheadLog:
        wal = WriteAheadLog(
            DIRECTORY,
            clock=self.clock,
            files=files or self.files,
            run_blocking=runner or self.runner,  # type: ignore[arg-type]
            now=lambda: 1_800_000_000,
        )
        wal.set_listener(self.durable.extend)
        self.recovered = wal.recover("boot-1:1")
        return wal

    def logged(self, level: str) -> list[str]:
        return [
            e["log_format"] for e in self.log_events if e["log_level"].name == level
        ]


class InterfaceTests(SynchronousTestCase):
    def test_journals_and_file_layers_provide_their_interfaces(self) -> None:
        """The real log, the volatile one and both file layers implement their seams."""
        clock = task.Clock()
        verifyObject(IEventJournal, WriteAheadLog(DIRECTORY, clock=clock, files=FakeWalFiles(),
                                                  run_blocking=synchronous_runner))
        verifyObject(IEventJournal, VolatileJournal())
        verifyObject(IWalFiles, FakeWalFiles())
        verifyObject(IWalFiles, OsWalFiles())


class GroupSyncTests(WalTestCase):
    def test_one_sync_for_a_turn_of_appends(self) -> None:
        """N records appended in one reactor turn are written and synced once, then handed on."""
        wal = self.open()
        for n in range(50):
            wal.append({"n": n}, n)
        self.assertEqual((self.runner.waiting, self.durable), (0, []))
        self.clock.advance(0)
        self.assertEqual(self.runner.waiting, 1)
        self.assertEqual(self.durable, [])
        self.runner.step()
        self.assertEqual(self.files.syncs, 1)
        self.assertEqual(self.durable, list(range(50)))
        [segment] = self.files.segments(DIRECTORY)
        records, damage = decode_segment(1, self.files.read(f"{DIRECTORY}/{segment}"), True)
        self.assertEqual((len(records), damage), (51, []))  # a header, then the 50
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_records_arriving_during_a_sync_form_the_next_batch(self) -> None:
        """While one batch is being synced, new records wait and then share one sync."""
        wal = self.open()
        wal.append("a", "a")
        self.clock.advance(0)
        for n in range(20):
            wal.append(n, n)
            self.clock.advance(0)
        self.assertEqual(self.runner.waiting, 1)
        self.runner.step()
        self.assertEqual(self.durable, ["a"])
        self.clock.advance(0)
        self.assertEqual(self.runner.waiting, 1)
        self.runner.step()
        self.assertEqual(self.files.syncs, 2)
        self.assertEqual(self.durable, ["a", *range(20)])
        self.assertEqual(wal.pending, 0)

    def test_unsynced_records_are_lost_at_a_crash_synced_ones_never(self) -> None:
        """A crash between write and sync loses that batch only; recovery reads the synced."""
        wal = self.open()
        wal.append({"n": 1}, 1)
        self.clock.advance(0)
        self.runner.step()
        wal.append({"n": 2}, 2)
        self.clock.advance(0)
        # the write reaches the page cache; the process dies before fdatasync returns
        wal._writer.sync_enabled = False
        self.runner.calls[0][0]()
        self.assertEqual(self.durable, [1])
        after = self.files.crash()
        self.durable.clear()
        self.open(files=after)
        self.assertEqual(self.recovered, [{"n": 1}])

    def test_sync_can_be_disabled(self) -> None:
        """With sync=False nothing is fdatasynced (benchmark peer only)."""
        wal = WriteAheadLog(DIRECTORY, clock=self.clock, files=self.files,
                            run_blocking=synchronous_runner, sync=False)
        wal.set_listener(self.durable.extend)
        wal.recover()
        wal.append(1, 1)
        self.clock.advance(0)
        self.assertEqual((self.durable, self.files.syncs), ([1], 0))

    def test_drain_fires_when_everything_so_far_is_durable(self) -> None:
        """drain() waits for the records appended before it, not for later ones."""
        wal = self.open()
        wal.append(1, 1)
        drained = wal.drain()
        self.clock.advance(0)
        wal.append(2, 2)
        self.assertNoResult(drained)
        self.runner.step()
        self.successResultOf(drained)


class RecoveryTests(WalTestCase):
    def write(self, wal: WriteAheadLog, *records: object) -> None:
        for record in records:
            wal.append(record, record)
        self.clock.advance(0)
        self.runner.run_all()

    def test_each_start_writes_a_new_segment(self) -> None:
        """Records of two runs are read back in order; the second run used a new segment."""
        wal = self.open()
        self.write(wal, {"n": 1}, {"n": 2})
        self.open()
        self.assertEqual(self.recovered, [{"n": 1}, {"n": 2}])
        wal = self.open()
        self.write(wal, {"n": 3})
        self.assertEqual(len(self.files.segments(DIRECTORY)), 2)
        self.open()
        self.assertEqual(self.recovered, [{"n": 1}, {"n": 2}, {"n": 3}])

    def test_torn_last_record_is_cut_with_a_warning(self) -> None:
        """Power lost mid-write: the partial record is cut, set aside, and the rest is kept."""
        wal = self.open()
        self.write(wal, {"n": 1})
        wal.append({"n": 2, "text": "x" * 100}, 2)
        self.clock.advance(0)
        wal._writer.sync_enabled = False
        self.runner.step()
        after = self.files.crash(torn=40)
        self.open(files=after)
        self.assertEqual(self.recovered, [{"n": 1}])
        [warning] = self.logged("warn")
        self.assertIn("the last record was torn", warning)
        [segment] = after.segments(DIRECTORY)
        path = f"{DIRECTORY}/{segment}"
        self.assertEqual(len(after.read(f"{path}.bad-1800000000")), 40)
        self.assertEqual(decode_segment(1, after.read(path), True)[1], [])

    def test_corrupt_record_is_dropped_and_the_others_kept(self) -> None:
        """A damaged record inside the log is an error; the records around it survive."""
        wal = self.open()
        self.write(wal, {"n": 1}, {"n": 2}, {"n": 3})
        [segment] = self.files.segments(DIRECTORY)
        path = f"{DIRECTORY}/{segment}"
        data = self.files.data[path]
        second = data.index(b'{"n":2}')
        data[second + 5] = ord("9")  # the checksum no longer matches
        self.open()
        self.assertEqual(self.recovered, [{"n": 1}, {"n": 3}])
        [error] = self.logged("error")
        self.assertIn("is damaged", error)
        self.assertIn(b'{"n":9}', self.files.read(f"{path}.bad-1800000000"))
        self.open()
        self.assertEqual(self.recovered, [{"n": 1}, {"n": 3}])
        self.assertEqual(len(self.logged("error")), 1)

    def test_garbage_file_does_not_stop_recovery(self) -> None:
        """A segment of random bytes yields no records and an error, never an exception."""
        self.files.replace(f"{DIRECTORY}/{segment_name(3)}", os.urandom(300) + b"\n" * 3)
        self.open()
        self.assertEqual(self.recovered, [])
        self.assertTrue(self.logged("error") or self.logged("warn"))

    def test_checkpointed_segments_are_skipped_and_deleted(self) -> None:
        """drop_through writes the marker first; segments up to it are never replayed."""
        wal = self.open()
        self.write(wal, {"n": 1})
        through = wal.rotate()
        self.write(wal, {"n": 2})
        wal.drop_through(through)
        self.runner.run_all()
        self.assertEqual(len(self.files.segments(DIRECTORY)), 1)
        self.open()
        self.assertEqual(self.recovered, [{"n": 2}])

    def test_interrupted_drop_is_still_covered_by_the_marker(self) -> None:
        """A crash after the marker but before the unlink: the old segment is not replayed."""
        wal = self.open()
        self.write(wal, {"n": 1})
        through = wal.rotate()
        self.write(wal, {"n": 2})
        self.files.replace(f"{DIRECTORY}/checkpoint", b'{"through": %d}' % through)
        self.open()
        self.assertEqual(self.recovered, [{"n": 2}])


class FaultTests(WalTestCase):
    def test_disk_full_holds_records_and_retries(self) -> None:
        """A failed write publishes nothing, says so once, and is retried into a new segment."""
        wal = self.open()
        self.files.disk_full()
        wal.append(1, 1)
        wal.append(2, 2)
        self.clock.advance(0)
        self.runner.step()
        self.assertEqual(self.durable, [])
        [error] = self.logged("error")
        self.assertIn("cannot write the job event log", error)
        wal.append(3, 3)
        self.clock.advance(0.5)
        self.runner.step()  # still full: no second error line
        self.assertEqual(len(self.logged("error")), 1)
        self.files.fail_with = None
        self.clock.advance(1.0)
        self.clock.advance(0)
        self.runner.step()
        self.assertEqual(self.durable, [1, 2, 3])
        self.assertIn("written again", self.logged("info")[-1])
        self.open(files=self.files.crash())
        self.assertEqual(self.recovered, [1, 2, 3])

    def test_close_gives_up_after_grace_on_a_dead_disk(self) -> None:
        """close() waits at most its grace; records never written are counted, not published."""
        wal = self.open(runner=synchronous_runner)
        self.files.disk_full()
        wal.append(1, 1)
        self.clock.advance(0)
        closed = wal.close(grace=10)
        self.assertNoResult(closed)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(closed), 1)
        self.assertEqual(self.durable, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(RuntimeError, wal.append, 2, 2)

    def test_os_files_round_trip(self) -> None:
        """Over real files: records written and synced are read back by a new log."""
        directory = self.mktemp()
        wal = WriteAheadLog(directory, clock=self.clock, run_blocking=synchronous_runner)
        wal.recover()
        wal.append({"ü": "line\nwith newline"}, 1)
        self.clock.advance(0)
        self.successResultOf(wal.close())
        again = WriteAheadLog(directory, clock=self.clock, run_blocking=synchronous_runner)
        self.assertEqual(again.recover(), [{"ü": "line\nwith newline"}])
        mode = os.stat(os.path.join(directory, segment_name(1))).st_mode & 0o777
        self.assertEqual(mode, 0o600)

    def test_encoding_is_one_line_with_a_checksum(self) -> None:
        """A record is one line whatever its text; a flipped bit is detected."""
        line = encode_record({"m": "a\nb"})
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(decode_segment(1, line, True)[0], [{"m": "a\nb"}])
        broken = bytearray(line)
        broken[12] ^= 1
        self.assertEqual(decode_segment(1, bytes(broken), True)[0], [])
