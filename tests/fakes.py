"""Test doubles shared by the unit tests, checked against the real seams in test_fakes.py.

FakeGroup implements coordinator.protocol.WorkerGroup with workers in lockstep and scripted
faults; FakeCommitter stands for coordinator.checkpoint.committer.Committer.
"""

from coordinator.protocol import (Heartbeat, PollResult, SaveReport, StepReport, TrainResult,
                                  WorkerFailure, WorkerInfo)


class FakeGroup:
    """Workers in lockstep that advance `steps_per_poll` steps per poll. Faults are scripted:
    `lose(ranks, kind, at_step)` kills ranks when the group reaches that step; survivors then
    see a collective error, as gloo makes them do. Newcomers become ready `spawn_polls` polls
    after `spawn`."""

    def __init__(self, steps_per_poll=5, slots=4):
        self.steps_per_poll = steps_per_poll
        self.slots = slots  # worker slots in the fake cluster; free() is what is left
        self.members = {}  # rank -> {"pid", "node", "step", "alive", "busy"}
        self.pending_new = []  # [pid, node, polls left]
        self.spawn_polls = 1
        self.spawn_nodes = ["node0", "node1", "node2"]  # where newcomers go, in turn
        self.next_pid = 1000
        self.until = None
        self.generation = None
        self.sources = []  # (generation, Source) per form
        self.form_failures = []  # failures to return from the next forms, in order
        self.killed = []
        self.blocked = set()  # survivors that stay in the failed collective until released
        self.stuck = set()  # ... and do not leave it even then (only a kill frees them)
        self.released = []  # (ranks, generation) per release
        self.silent = {}  # rank -> seconds without a heartbeat, reported by poll
        self.stop_mode = 0
        self.save_requests = []  # (request number, the group's step when it was asked)
        self.saved_number = 0
        self.last_restore_s = 0.0
        self.last_join_parts = {}
        self.last_transfer_bytes = 0
        self.buddies = {}
        self.memory = {}  # rank -> (generation, {owner: [steps]}, world) its heartbeats report
        self.faults = []  # [at_step, ranks, kind]
        self.lag = {}  # rank -> steps behind when a fault stops the group
        self.hold_last = set()  # ranks whose last step's report comes a poll after a fault
        self._held = {}  # rank -> reports held back
        self.shut = False
        self.form_polls = 0  # polls a formation takes before it answers
        self.aborted = []  # generations whose formation was aborted
        self.digest_asked = False
        self.digest_failures = []  # failures to return from the next digest polls, in order
        self._forming = 0
        self._finished = {}
        self._late = []
        # steps whose loss is non-finite when trained (not when `launch` says skip them), and
        # the run of them in a row at which the members stop (failure.nonfinite: None = skip)
        self.poisoned = set()
        self.nonfinite_stop_at = None
        self.skip = set()
        self.launched_skips = []  # the skip list of every launch
        self._streak = 0

    def free(self):
        alive = sum(1 for m in self.members.values() if m["alive"])
        return max(0, self.slots - alive - len(self.pending_new))

    # membership
    def _new(self, node):
        self.next_pid += 1
        return {"pid": self.next_pid, "node": node, "step": 0, "alive": True, "busy": False}

    def spawn(self, n, exclude=()):
        if not self.members and not self.pending_new:
            # the first workers of the job: ready at once, ranks 0.. on two nodes, pids 1000..
            for r in range(n):
                m = self._new(f"node{r % 2}")
                m["pid"] = 1000 + r
                self.pending_new.append([m, 0])
            return n
        nodes = [nd for nd in self.spawn_nodes if nd not in exclude]
        for i in range(n):
            self.pending_new.append([self._new(nodes[i % len(nodes)]), self.spawn_polls])
        return n

    def drop_newcomers(self):
        self.pending_new = []

    def capacity_note(self, exclude=()):
        return f"{self.free()} free slots"

    def collect_ready(self):
        return sum(1 for _, left in self.pending_new if left <= 0)

    def pending(self):
        return len(self.pending_new)

    def assign(self, ranks, newcomers, spares=()):
        members = {new: self.members[old] for old, new in ranks.items()}
        self.pending_new.extend([self.members[old], 0] for old in spares)
        added = []
        for r in newcomers:
            i = next(i for i, (_, left) in enumerate(self.pending_new) if left <= 0)
            m, _ = self.pending_new.pop(i)
            members[r] = m
            added.append(WorkerInfo(r, m["pid"], m["node"], "host"))
        self.members = members
        return added

    def ranks(self):
        return sorted(self.members)

    # a generation
    def begin_form(self, generation, source):
        self.generation = generation
        self.sources.append((generation, source))
        self._forming = self.form_polls

    def abort_form(self):
        self.aborted.append(self.generation)

    def poll_form(self):
        if self._forming > 0:  # a slow formation: members still joining
            self._forming -= 1
            return None
        source = self.sources[-1][1]
        if self.form_failures:
            return self.form_failures.pop(0)
        step = {"peer": None, "checkpoint": None}.get(source.kind, 0)
        if source.kind == "peer":
            step = self.members[source.src]["step"]
        elif source.kind == "checkpoint":
            step = int(source.path.rsplit("-", 1)[1])
        elif source.kind == "memory":
            step = source.step
        for m in self.members.values():
            m["step"] = step
        return []

    def launch(self, until_step, skip=()):
        self.until = until_step
        self.skip = set(skip)
        self.launched_skips.append(sorted(skip))
        self._streak = 0
        self.stop_mode = 0
        self._finished = {}
        for m in self.members.values():
            m["busy"] = True

    def busy(self):
        return {r for r, m in self.members.items() if m["busy"] and m["alive"]}

    def poll(self, fresh=False, wait_s=None):
        late, self._late = self._late, []
        for entry in self.pending_new:
            entry[1] -= 1
        alive = {r: m for r, m in self.members.items() if m["alive"]}
        res = PollResult(silent_s={r: self.silent.get(r, 0.0) for r in alive})
        res.failures.extend(late)
        running = {r: m for r, m in alive.items() if m["busy"] and not m.get("blocked")}
        old = {r: m["step"] for r, m in alive.items()}
        faulted = False
        if running:
            step = max(m["step"] for m in running.values())
            target = min(self.until, step + self.steps_per_poll)
            if self.stop_mode:
                target = min(target, step + 1)
            fault = next((f for f in self.faults if f[0] <= target), None)
            if fault is not None:
                self.faults.remove(fault)
                faulted = True
                at, ranks, kind = fault[:3]
                if len(fault) > 3:
                    self.slots = fault[3]  # e.g. a node went away with its slots
                for r, m in running.items():
                    m["step"] = max(m["step"], at - self.lag.get(r, 0))
                    m["busy"] = False
                    if r not in ranks and r in self.blocked:
                        m["busy"] = m["blocked"] = True  # waits on a peer that waits on the lost
                        continue
                    if r in ranks:
                        m["alive"] = False
                        f = WorkerFailure(r, kind.replace("_late", ""), m["pid"], "boom")
                        # "_late": the survivors' errors arrive one poll before the death
                        (self._late if kind.endswith("_late") else res.failures).append(f)
                    else:
                        res.failures.append(WorkerFailure(r, "collective_error", m["pid"],
                                                          "peer closed"))
            else:
                nonfinite = False
                for s in range(step + 1, target + 1):  # the members stop on a run of them
                    self._streak = self._streak + 1 if self._live_nonfinite(s) else 0
                    if self.nonfinite_stop_at and self._streak >= self.nonfinite_stop_at:
                        target, nonfinite = s, True
                        break
                for m in running.values():
                    m["step"] = target
                if target >= self.until or self.stop_mode or nonfinite:
                    for r, m in running.items():
                        m["busy"] = False
                        res.finished[r] = TrainResult(target, target < self.until, nonfinite)
        world = len(self.members)
        # A checkpoint asked for is taken at the step the group reached (every member writes).
        due = [n for n, _ in self.save_requests if n > self.saved_number]
        saves = []
        if due and running and not res.failures:
            self.saved_number = max(due)
            saves = [SaveReport(target, r, True, stall_s=0.05, persist_s=0.2,
                                generation=self.generation, world_size=world) for r in running]
        for r, m in alive.items():  # a rank lost in this poll reported its steps before dying
            reps = [StepReport(s, (10.0 - s / 10) / world, 100.0 + s, 1.0,  # a step a second
                               skipped=s in self.skip or self._live_nonfinite(s),
                               nonfinite=self._live_nonfinite(s))
                    for s in range(old[r] + 1, m["step"] + 1)]
            reps = self._held.pop(r, []) + reps
            if faulted and r in self.hold_last and m["alive"] and reps:
                self._held[r] = [reps.pop()]
            res.heartbeats[r] = Heartbeat(r, self.generation, m["step"], reps,
                                          [x for x in saves if x.rank == r],
                                          *self._memory_of(r))
            if not m["alive"]:
                res.silent_s.pop(r, None)
        return res

    def _memory_of(self, r):
        gen, held, world = self.memory.get(r, (None, {}, 0))
        return gen, held, world, 0

    def _live_nonfinite(self, step):
        return step in self.poisoned and step not in self.skip

    def request_stop(self, mode):
        self.stop_mode = max(self.stop_mode, mode)

    def request_checkpoint(self, number):
        steps = [m["step"] for m in self.members.values() if m["alive"]]
        self.save_requests.append((number, max(steps, default=0)))

    def chaos(self, rank, action, arg=None):
        self.faults.append([self.members[rank]["step"] + 1, [rank], "process_exit"])

    def begin_digest(self):
        self.digest_asked = True

    def poll_digest(self):
        if self.digest_failures:  # a worker lost while the digest is taken
            lost = self.digest_failures.pop(0)
            for f in lost:
                self.members[f.rank]["alive"] = False
            return None, lost
        return ("abc123" if self.digest_asked else None), []

    def wait(self, timeout_s):
        pass

    def pid(self, rank):
        return self.members[rank]["pid"] if rank in self.members else None

    def node_of(self, rank):
        return self.members[rank]["node"] if rank in self.members else None

    def release(self, ranks, generation):
        """Released members leave the failed collective, unless `stuck` (ranks whose process
        cannot answer) says otherwise."""
        self.released.append((sorted(ranks), generation))
        for r in ranks:
            if r in self.members and r not in self.stuck:
                self.members[r]["busy"] = self.members[r]["blocked"] = False

    def kill(self, rank):
        self.killed.append(rank)
        m = self.members[rank]
        m["alive"], m["busy"] = False, False
        self.silent.pop(rank, None)
        for r, other in self.members.items():  # its peers leave the collective
            other["busy"] = other["blocked"] = False

    def shutdown(self):
        self.shut = True


class FakeCommitter:
    """A committer whose storage holds one committed checkpoint at `step` (found on resume only
    with `resume=True`); saves of every rank commit at once and are announced on `bus`."""

    def __init__(self, step, bus, resume=True):
        self.step, self.bus, self.resume = step, bus, resume
        self.committed, self.failed, self.protected = [step], [], set()
        self.resolved = 0

    def resolve_resume(self):
        from coordinator.checkpoint.manifest import CheckpointInfo

        self.resolved += 1
        if not self.resume and self.resolved == 1:
            return None
        return CheckpointInfo(self.step, f"/ckpt/step-{self.step:08d}", "committed", "", {}, 4)

    def latest_step(self):
        return self.step

    def end_generation(self, generation):
        pass

    def poll(self):
        pass

    def on_save(self, rep):
        save = rep
        if save.ok and save.step not in self.committed:
            self.committed.append(save.step)
            self.bus.emit("checkpoint_committed", step=save.step, uri=f"/ckpt/{save.step}",
                          bytes=1, stall_s=save.stall_s, persist_s=save.persist_s)
