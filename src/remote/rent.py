"""`remote_train --rent QUERY EXPERIMENT`: from nothing rented to results home, in one command.

    search (cheapest first) -> create (the kit's onstart) -> boot (an SSH port, then SSH
    answering; --boot-timeout each) -> connect -> sync -> install -> check -> train ->
    retrieve -> verify -> destroy through the download gate

A machine that fails to boot, fails its check, or vanishes mid-run is recorded as a bad host
in the state file (``rent_state``) and the next offer is taken. One that never trained is
destroyed at once: there is nothing on it to download, so no gate is needed. After a host
vanished mid-run the next machine resumes from the S3 mirror (``checkpoint.s3_bucket`` is
required). At most ``--max-attempts`` machines, never past ``--max-total-usd`` (each
machine's $/h from its offer, from its create to its destroy). A failure of the run itself
(a crash, a config error) is not the host's fault: the loop stops there and the machine
stays, listed, for you to look at. Ctrl-C asks, for the machine held, keep (the default) or
destroy.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from omegaconf import OmegaConf

from src.cloud.machines import SshAddress, format_duration
from src.cloud.provider import CloudError
from src.cloud.registry import PROVIDER_KEYS, configured_renter
from src.cloud.renting import MaybeRented, Offer, Renter
from src.common.paths import REPO_ROOT
from src.config import ConfigError
from src.remote.args import RENTED_HOST, Experiment, UsageError, default_local_dir
from src.remote.pipeline import RemoteTrain
from src.remote.plan import merged_config
from src.remote.rent_state import RentState
from src.remote.stages import EXIT_DETACHED, StageError, StageReporter

RENT_LABEL = "gpu-train-kit-rent"


@dataclass
class Held:
    """The machine this command holds now."""

    key: str  # in the state file
    machine_id: str
    offer: Offer
    created_at: float  # monotonic
    ssh: SshAddress | None = None
    trained: bool = False  # training started there: its outputs matter


def require_s3_mirror(experiments: list[Experiment]) -> str:
    """The bucket the first experiment mirrors to; UsageError (one line) when none is set:
    a rented host may vanish, and only the mirror lets the next machine resume."""
    experiment = experiments[0]
    try:
        cfg = merged_config(experiment.path, experiment.args, REPO_ROOT, where="laptop")
    except ConfigError as error:
        raise UsageError(f"{experiment.path}: {error}") from None
    bucket = OmegaConf.select(cfg, "checkpoint.s3_bucket", default=None)
    if not bucket:
        raise UsageError(
            "--rent needs checkpoint.s3_bucket (a rented host may vanish; the next machine "
            "resumes from the S3 mirror): set it in the config or add checkpoint.s3_bucket=NAME"
        )
    prefix = OmegaConf.select(cfg, "checkpoint.s3_prefix", default="checkpoints")
    return f"s3://{bucket}/{prefix}"


def port_answers(address: SshAddress, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ask_keep_or_destroy(question: str, stdin: TextIO | None = None) -> str:
    """'keep' or 'destroy'; keep without a terminal to ask on (or on any other answer)."""
    stdin = sys.stdin if stdin is None else stdin
    if not stdin.isatty():
        return "keep"
    print(question, end="", flush=True)
    try:
        answer = stdin.readline().strip().lower()
    except (KeyboardInterrupt, EOFError):
        return "keep"
    return "destroy" if answer in ("d", "destroy") else "keep"


class Rent:
    """One ``--rent`` invocation: the offer loop, its state file, its budget."""

    def __init__(
        self,
        args: argparse.Namespace,
        experiments: list[Experiment],
        settings: Mapping[str, str],
        reporter: StageReporter,
        renter: Renter,
        state: RentState,
        mirror: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.args = args
        self.experiments = experiments
        self.settings = settings
        self.reporter = reporter
        self.renter = renter
        self.state = state
        self.mirror = mirror
        self.clock, self.sleep = clock, sleep
        self.provider_key = args.provider
        self.spent_usd = 0.0  # machines already released
        self.attempts = 0
        self.tried: set[str] = set()
        self.held: Held | None = None
        self.resuming = False

    # -- reporting and money ---------------------------------------------------------------

    def say(self, text: str) -> None:
        self.reporter.line(f"[rent] {text}")

    def name(self, held: Held) -> str:
        return f"{self.renter.provider.machine_kind} {held.machine_id}"

    def cost_of(self, held: Held) -> float:
        return held.offer.hourly_rate_usd * max(0.0, self.clock() - held.created_at) / 3600

    def total_spent(self) -> float:
        return self.spent_usd + (self.cost_of(self.held) if self.held else 0.0)

    def over_budget(self) -> bool:
        budget = self.args.max_total_usd
        return budget is not None and self.total_spent() >= budget

    def budget_line(self) -> str:
        return f"${self.total_spent():.2f} spent of --max-total-usd {self.args.max_total_usd:g}"

    def nothing_left(self) -> str:
        return f"no machine of this command is left running (state file {self.state.path})"

    # -- machines --------------------------------------------------------------------------

    def pick_offer(self, query: object) -> Offer:
        offers = self.renter.offers(query)
        skip_s = self.args.skip_bad_hours * 3600
        for offer in offers:
            if offer.id in self.tried:
                continue
            reason = self.state.bad_reason(self.provider_key, offer.host_id, skip_s)
            if reason is not None:
                self.say(f"skipping {offer.describe()}: its host failed recently ({reason})")
                self.tried.add(offer.id)
                continue
            if offer.disk_gb < self.args.disk:
                self.say(
                    f"skipping {offer.describe()}: its disk is smaller than the "
                    f"{self.args.disk:g} GB the run asks for (--disk)"
                )
                self.tried.add(offer.id)
                continue
            return offer
        raise StageError(
            "rent",
            f"no offer left that fits ({len(offers)} found, {len(self.tried)} tried or "
            f"skipped): loosen QUERY or try later; {self.nothing_left()}",
        )

    def create(self, offer: Offer) -> Held | None:
        pending = self.state.creating(
            self.provider_key, offer.id, offer.hourly_rate_usd, offer.host_id
        )
        try:
            machine_id = self.renter.create(offer, self.args.disk, RENT_LABEL)
        except MaybeRented:
            raise  # the "creating" entry stays: --rented says which offer to look for
        except CloudError as error:  # surely not rented (taken meanwhile, refused): next
            self.state.gone(pending)
            self.say(f"could not rent {offer.describe()}: {error}; trying the next offer")
            return None
        key = self.state.created(pending, machine_id)
        held = Held(key, machine_id, offer, self.clock())
        self.held = held
        self.say(f"created {self.name(held)} from {offer.describe()}")
        return held

    def release(self, held: Held, why: str) -> None:
        """Destroy a machine nothing trained on (no gate: nothing to download)."""
        self.renter.release_unused(held.machine_id)
        self.close(held)
        self.say(f"destroyed {self.name(held)} ({why}; nothing trained there)")

    def close(self, held: Held) -> None:
        self.spent_usd += self.cost_of(held)
        self.state.gone(held.key)
        self.held = None

    def fail_host(self, held: Held, reason: str) -> None:
        self.say(f"{self.name(held)} failed: {reason}")
        self.state.mark_bad(self.provider_key, held.offer.host_id, reason, held.offer.id)
        self.release(held, "failed before training")

    def boot(self, held: Held) -> str | None:
        """Wait for an SSH port, then for it to answer; None once it does, else the reason."""
        timeout = self.args.boot_timeout
        started = self.clock()
        last = ""
        while True:
            boot = self.renter.boot_state(held.machine_id)
            if boot.gone:
                return "vanished while booting"
            if boot.describe() != last:
                last = boot.describe()
                self.say(f"{self.name(held)}: {last} ({self.clock() - started:.0f} s)")
            if boot.ssh is not None:
                break
            self.stop_if_over_budget(held)
            if self.clock() - started >= timeout:
                return f"no SSH port after {timeout:g} s (still {last})"
            self.sleep(self.args.poll_interval)
        address = boot.ssh
        started = self.clock()
        while not port_answers(address):
            self.stop_if_over_budget(held)
            if self.clock() - started >= timeout:
                return f"SSH at {address.host}:{address.port} did not answer within {timeout:g} s"
            self.sleep(self.args.poll_interval)
        held.ssh = address
        self.say(f"{self.name(held)}: SSH answers at {address.host}:{address.port}")
        return None

    def stop_if_over_budget(self, held: Held) -> None:
        if self.over_budget():
            self.release(held, "--max-total-usd reached")
            raise StageError("rent", f"stopped: {self.budget_line()}; {self.nothing_left()}")

    # -- one machine -----------------------------------------------------------------------

    def remote_train_for(self, held: Held) -> RemoteTrain:
        assert held.ssh is not None
        args = copy.copy(self.args)
        args.host = f"{held.ssh.user}@{held.ssh.host}"
        args.port = held.ssh.port
        args.machine = held.machine_id
        args.destroy_after = not (self.args.keep or self.args.stop_after)
        args.local_dir = self.args.local_dir or str(default_local_dir(RENTED_HOST))
        experiments = self.experiments
        if self.args.max_total_usd is not None:  # the trainer stops itself at what is left
            left = max(0.0, self.args.max_total_usd - self.total_spent())
            rate = held.offer.hourly_rate_usd
            extra = [f"cost.hourly_rate_usd={rate:g}", f"cost.budget_usd={left:.4f}"]
            experiments = [Experiment(e.path, [*e.args, *extra]) for e in experiments]
        return RemoteTrain(args, experiments, self.settings, self.reporter)

    def connect(self, held: Held, train: RemoteTrain) -> bool:
        """SSH in; a port may accept before the machine's sshd is up, so retry until the
        boot timeout. False (the host failed and was released) when it never lets us in."""
        started = self.clock()
        while True:
            try:
                train.connect()
                return True
            except StageError as error:
                train.close()
                if self.clock() - started >= self.args.boot_timeout:
                    self.fail_host(held, str(error))
                    return False
                self.say(f"{self.name(held)}: SSH not ready yet ({error.reason}); trying again")
                self.stop_if_over_budget(held)
                self.sleep(self.args.poll_interval)

    def try_machine(self, held: Held) -> int | None:
        """The whole run on ``held``: its exit code, or None to go on with the next offer."""
        reason = self.boot(held)
        if reason is not None:
            self.fail_host(held, reason)
            return None
        train = self.remote_train_for(held)
        if not self.connect(held, train):
            return None
        try:
            train.prepare_host()
        except StageError as error:
            train.close()
            self.fail_host(held, str(error))
            return None
        held.trained = True
        self.state.update(held.key, state="training", ssh=f"{train.args.host}:{held.ssh.port}")
        failure: StageError | None = None
        try:
            code = train.train_and_bring_home()
        except StageError as error:
            failure, code = error, error.exit_code
        finally:
            train.close()
        if code == EXIT_DETACHED:
            raise KeyboardInterrupt
        if code != 0 and self.renter.boot_state(held.machine_id).gone:
            reason = "vanished mid-run"
            self.say(f"{self.name(held)} {reason}: the next machine resumes from {self.mirror}")
            self.state.mark_bad(self.provider_key, held.offer.host_id, reason, held.offer.id)
            self.close(held)
            self.resuming = True
            return None
        if failure is not None:
            self.say(self.left_line(held))
            raise failure
        return self.finish(held, code, train)

    def left_line(self, held: Held) -> str:
        rate = held.offer.hourly_rate_usd
        return (
            f"{self.name(held)} (${rate:.3f}/h) is left as it is and stays listed in "
            f"{self.state.path}: destroy it with "
            f"{self.renter.provider.hand_command('destroy', held.machine_id)}"
        )

    def finish(self, held: Held, code: int, train: RemoteTrain) -> int:
        cost = self.total_spent()
        if code == 0 and train.shutdown_action == "destroy":
            self.close(held)
            self.say(f"done: {self.attempts} machine(s), about ${cost:.2f} in all")
        elif code == 0:
            how = "stopped" if train.shutdown_action == "stop" else "kept"
            self.state.update(held.key, state=how)
            self.say(f"done, about ${cost:.2f} so far; {self.left_line(held)}")
            self.held = None
        else:
            self.say(self.left_line(held))
        return code

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self.loop()
        except KeyboardInterrupt:
            return self.interrupted()
        except MaybeRented as error:
            raise StageError(
                "rent",
                f"{error}; the offer stays listed in {self.state.path} (--rented) until you "
                "know whether a machine was made",
            ) from None
        except CloudError as error:
            held = f"; {self.left_line(self.held)}" if self.held else f"; {self.nothing_left()}"
            raise StageError("rent", f"{error}{held}") from None

    def loop(self) -> int:
        query = self.args.rent_query
        while True:
            if self.attempts >= self.args.max_attempts:
                raise StageError(
                    "rent",
                    f"stopped after {self.attempts} machine(s) (--max-attempts "
                    f"{self.args.max_attempts}); {self.nothing_left()}",
                )
            if self.over_budget():
                raise StageError("rent", f"stopped: {self.budget_line()}; {self.nothing_left()}")
            offer = self.pick_offer(query)
            self.tried.add(offer.id)
            what = "resume the run" if self.resuming else "the run"
            self.say(f"machine {self.attempts + 1} of at most {self.args.max_attempts} for {what}")
            held = self.create(offer)
            if held is None:
                continue
            self.attempts += 1
            code = self.try_machine(held)
            if code is not None:
                return code

    def interrupted(self) -> int:
        held = self.held
        if held is None:
            self.reporter.error(f"rent interrupted; {self.nothing_left()}")
            return EXIT_DETACHED
        question = f"Ctrl-C: keep or destroy {self.name(held)}? [K/d] "
        answer = ask_keep_or_destroy(question)
        if answer == "destroy" and not held.trained:
            self.release(held, "Ctrl-C")
            self.reporter.error(f"rent interrupted; {self.nothing_left()}")
            return EXIT_DETACHED
        if answer == "destroy":  # it trained: only the gate may destroy it
            self.say(
                f"not destroying {self.name(held)} here: it trained and its outputs are not "
                "verified home; the command below destroys it through the download gate"
            )
        goes_on = " (its run goes on)" if held.trained else ""
        self.reporter.error(
            f"rent interrupted: kept {self.name(held)}{goes_on}; {self.left_line(held)}"
        )
        return EXIT_DETACHED


def rent(
    args: argparse.Namespace,
    experiments: list[Experiment],
    settings: Mapping[str, str],
    reporter: StageReporter,
    state: RentState,
) -> int:
    """Everything checked before the first API call, then the loop."""
    mirror = require_s3_mirror(experiments)
    try:
        renter = configured_renter(args.provider, settings)
    except CloudError as error:
        raise UsageError(str(error)) from None
    return Rent(args, experiments, settings, reporter, renter, state, mirror).run()


def list_rented(settings: Mapping[str, str], state: RentState, out: TextIO | None = None) -> int:
    """``remote_train --rented``: every machine the state file lists, with its cost so far."""
    out = sys.stdout if out is None else out
    machines = state.machines()
    if not machines:
        print(f"no rented machines listed in {state.path}", file=out)
        return 0
    now = time.time()
    for key, entry in sorted(machines.items()):
        provider_key = str(entry.get("provider"))
        renter = configured_renter(provider_key, settings)
        kind = renter.provider.machine_kind
        rate = float(entry.get("hourly_rate_usd") or 0.0)
        age = max(0.0, now - float(entry.get("created_at") or now))
        cost = f"${rate:.3f}/h, up {format_duration(age)}, about ${rate * age / 3600:.2f} so far"
        if entry.get("id") is None:
            print(
                f"{PROVIDER_KEYS.get(provider_key, provider_key)} offer {entry.get('offer')}: a "
                f"create was sent {format_duration(age)} ago and its answer never recorded: "
                f"check {renter.provider.hand_command('status')} ({cost})",
                file=out,
            )
            continue
        machine_id = str(entry["id"])
        boot = renter.boot_state(machine_id)
        if boot.gone:
            state.gone(key)
            print(f"{kind} {machine_id}: gone, no longer billed (removed from the list)", file=out)
            continue
        print(
            f"{renter.provider.name} {kind} {machine_id} ({entry.get('state')}, {boot.describe()})"
            f": {cost}; destroy: {renter.provider.hand_command('destroy', machine_id)}",
            file=out,
        )
    return 0
