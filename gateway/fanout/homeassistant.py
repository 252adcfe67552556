"""The Home Assistant consumer: discovery configs and retained states for the devices the gateway sees.

    telemetry batch ──▶ per event: the device's latest values (one dict update), an anomaly episode's start or end
                        ──▶ gateway/ha/{device}/anomaly ON / OFF, at once (rare, and never coalesced away)
                  └──▶ every STATE_INTERVAL, the devices that sent something since the last update:
                        first time since the start (or since the profiles changed): their discovery configs
                        then gateway/ha/{device}/state, retained: every field's latest value in one JSON object

What the topics and configs are: gateway/fanout/ha_discovery.py. Like the live counts (fanout/stats.py) a batch is
done when the update that carries it was acknowledged by the broker, so after a crash the batches after the
committed offset are read back and the latest values published again. A reading costs a dict update; a burst from
one device becomes one state message per interval, whatever its rate, which is also what Home Assistant's recorder
wants to store. An episode that starts and ends within one interval still shows as ON then OFF.

A device is announced once per run: its configs are retained, so Home Assistant finds them after its own restart
without the gateway. Announced again: after the gateway's restart (at the device's first reading), when the device
sends a field it had not sent before, and when SIGHUP brings other profiles. The anomaly state published with the
announcement is the detector's (`in_episode`), which the detector rebuilt from the log at start, so a device in the
middle of an episode stays ON across a restart.

With `remove_after`, a device that stays silent that many seconds of the gateway's running time is removed: an empty
retained message on each of its configs (Home Assistant deletes the entities) and on its state topics. Which devices
were announced with which fields, and how long each has been silent, is kept in `homeassistant.json` in the data
folder (replaced atomically every tenth of `remove_after`, at most every SAVE_EVERY, after a removal and at a clean
stop), so a device that goes away while the gateway is down is still removed after the start. The time the gateway
was down does not count as silence: the gateway could not have heard the device then. A removed device that sends
again is announced again. Without `remove_after` none of this is kept, in memory or on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from devices.profiles import ProfileIndex
from gateway.event import Event, InTransaction, compact_json
from gateway.fanout.ha_discovery import ANOMALY_OFF, ANOMALY_ON, NOT_FIELDS, Discovery, fields_of
from gateway.mqtt.acks import AckedBatch
from gateway.ops.metrics import Metrics

log = logging.getLogger(__name__)

STATE_INTERVAL = 1.0  # seconds: at most one state message per device this often
MAX_DEVICES = 100_000  # devices whose latest values are kept; beyond, the oldest is forgotten (and announced again)
SAVE_EVERY = 300.0  # seconds: how often the known devices' silences are saved while removal is on


class Publisher(Protocol):
    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Any = None) -> bool: ...

    async def room(self) -> None: ...




class HomeAssistantSink:
    name = "homeassistant"

    def __init__(self, publisher: Publisher, discovery: Discovery, profiles: ProfileIndex,
                 in_episode: Callable[[str], bool] | None, metrics: Metrics, *,
                 interval: float = STATE_INTERVAL, max_devices: int = MAX_DEVICES, remove_after: float = 0.0,
                 known_file: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._publisher = publisher
        self._discovery = discovery
        self._profiles = profiles
        self._in_episode = in_episode  # None: no anomaly model, so no anomaly binary sensor
        self._metrics = metrics
        self._interval = interval
        self._max_devices = max_devices
        self._latest: dict[str, dict[str, Any]] = {}  # device id -> every field's latest value
        self._announced: dict[str, frozenset[str]] = {}  # device id -> the fields whose configs were published
        self._dirty: set[str] = set()
        self._next: AckedBatch | None = None  # the update that will carry what is dirty now
        self._last = 0.0
        self._remove_after = remove_after
        self._known_file = known_file
        self._clock = clock
        # With removal on: every device heard and not removed, this run or before, least recently heard first, with
        # when (on `clock`; a device known from the file counts as heard its saved silence ago), at most max_devices;
        # and the fields whose configs each was announced with.
        self._heard: OrderedDict[str, float] = OrderedDict()
        self._known: dict[str, frozenset[str]] = {}
        self._saving = asyncio.Lock()  # one save at a time: they share the temporary file
        if remove_after > 0 and known_file is not None:
            self._load(known_file)

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any]:
        # Every event joins the pending update before anything here waits: the update cannot be taken from under
        # half a batch while a publish waits for room.
        update = self._pending()
        latest, dirty = self._latest, self._dirty
        episodes: list[tuple[str, bytes]] = []
        for event in events:
            device = event.source_id
            values = latest.get(device)
            if values is None:
                if len(latest) >= self._max_devices:
                    self._forget(next(iter(latest)))
                values = latest[device] = {}
            values.update(event.payload)
            dirty.add(device)
            verdict = event.verdict
            if verdict is not None and verdict.detail is not None:
                episode = verdict.detail.get("episode")
                if episode is not None:
                    episodes.append((device, ANOMALY_ON if episode == "start" else ANOMALY_OFF))
        if self._in_episode is not None:
            for device, state in episodes:
                await self._publish(self._discovery.anomaly_topic(device), state, update)
            if episodes:
                self._metrics.inc("ha_states_published", len(episodes))
        return update.future

    def state(self, results: list[Any]) -> InTransaction | None:
        return None

    def reprofile(self, profiles: ProfileIndex) -> None:
        """SIGHUP brought other profiles: announce every known device again, with its new units and fields."""
        self._profiles = profiles
        self._announced.clear()
        self._dirty.update(self._latest)
        if self._dirty:
            self._pending()

    def _forget(self, device: str) -> None:
        del self._latest[device]
        self._announced.pop(device, None)
        self._dirty.discard(device)

    def _pending(self) -> AckedBatch:
        if self._next is None:
            self._next = AckedBatch(asyncio.get_running_loop())
            asyncio.ensure_future(self._update(self._next))
        return self._next

    async def _publish(self, topic: bytes, payload: bytes, update: AckedBatch) -> None:
        update.pending += 1
        while not self._publisher.publish(topic, payload, 1, True, update):
            await self._publisher.room()

    async def _update(self, update: AckedBatch) -> None:
        wait = self._interval - (time.monotonic() - self._last)
        if wait > 0:
            await asyncio.sleep(wait)  # whatever arrives meanwhile joins this update
        devices, self._dirty, self._next = self._dirty, set(), None
        self._last = time.monotonic()
        if self._remove_after > 0:
            self._hear(devices)
        try:
            configs = states = 0
            for device in sorted(devices):
                values = self._latest.get(device)
                if values is None:
                    continue  # forgotten meanwhile
                configs += await self._announce(device, values, update)
                await self._publish(self._discovery.state_topic(device), compact_json(values), update)
                states += 1
            self._metrics.inc("ha_configs_published", configs)
            self._metrics.inc("ha_states_published", states)
        except Exception as exc:  # the consumer reads these events again from the log
            log.error("homeassistant: update failed: %r", exc)
            if not update.future.done():
                update.future.set_exception(exc)
            return
        update.seal()

    async def _announce(self, device: str, values: dict[str, Any], update: AckedBatch) -> int:
        """Publish the configs the device does not have yet: every required field of its profile and every field it sent,
        and the first time, the anomaly binary sensor and its state. Returns how many configs were published."""
        announced = self._announced.get(device)
        sent = values.keys() - NOT_FIELDS
        if announced is not None and sent <= announced:
            return 0
        profile = self._profiles.get(device)
        fields = fields_of(profile) | sent
        d = self._discovery
        n = 0
        for field in sorted(fields - (announced or frozenset())):
            await self._publish(d.sensor_topic(device, field), d.sensor_config(device, field, profile), update)
            n += 1
        if announced is None and self._in_episode is not None:
            await self._publish(d.anomaly_config_topic(device), d.anomaly_config(device, profile), update)
            await self._publish(d.anomaly_topic(device),
                                ANOMALY_ON if self._in_episode(f"devices/{device}") else ANOMALY_OFF, update)
            self._metrics.inc("ha_states_published")
            n += 1
        self._announced[device] = fields
        if self._remove_after > 0:
            self._known[device] = self._known.get(device, frozenset()) | fields
        return n

    # --- removing the devices that went away -------------------------------------------------------------------------

    def _hear(self, devices: set[str]) -> None:
        heard, now = self._heard, self._clock()
        for device in devices:
            heard[device] = now
            heard.move_to_end(device)
        while len(heard) > self._max_devices:  # the longest silent is no longer tracked (its configs stay)
            device, _ = heard.popitem(last=False)
            self._known.pop(device, None)

    async def remove_silent(self) -> list[str]:
        """Remove every known device silent for `remove_after`: empty retained messages on its configs and states,
        done once the broker acknowledged them. Returns the devices removed."""
        if self._remove_after <= 0:
            return []
        now = self._clock()
        silent = sorted(d for d, t in self._heard.items() if now - t >= self._remove_after and d not in self._dirty)
        if not silent:
            return []
        batch = AckedBatch(asyncio.get_running_loop())
        for device in silent:
            # Forgotten before the first publish waits: a reading arriving meanwhile announces the device anew,
            # and its configs follow the empty ones on the same connection.
            fields = self._known.pop(device, frozenset())
            del self._heard[device]
            self._announced.pop(device, None)
            self._latest.pop(device, None)
            for topic in self._discovery.retained_topics(device, fields):
                await self._publish(topic, b"", batch)
        batch.seal()
        await batch.future
        self._metrics.inc("ha_devices_removed", len(silent))
        log.info("homeassistant: removed %d device(s) silent for %.0f s or more: %s", len(silent),
                 self._remove_after, ", ".join(silent[:10]) + (", ..." if len(silent) > 10 else ""))
        await self._save()
        return silent

    async def run_removal(self) -> None:
        """Check for silent devices every tenth of `remove_after` (at most every SAVE_EVERY), saving the silences
        as it goes. Runs only when removal is on."""
        period = min(self._remove_after / 10, SAVE_EVERY)
        while True:
            await asyncio.sleep(period)
            if not await self.remove_silent():
                await self._save()

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            now = self._clock()
            heard = sorted((now - max(0.0, float(entry["silent"])), device, frozenset(entry["fields"]))
                           for device, entry in doc["devices"].items())
            for at, device, fields in heard[-self._max_devices:]:  # least recently heard first
                self._heard[device] = at
                self._known[device] = fields
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only removal depends on it: the devices it named are announced again when they send.
            log.error("homeassistant: %s is unreadable (%r); devices announced before are not removed unless "
                      "they send again", path, exc)
            self._known.clear()
            self._heard.clear()

    def _document(self) -> bytes:
        now = self._clock()
        return json.dumps({"devices": {d: {"fields": sorted(f), "silent": round(now - self._heard.get(d, now), 1)}
                                       for d, f in sorted(self._known.items())}}, indent=1).encode()

    async def _save(self) -> None:
        if self._known_file is None:
            return
        try:
            async with self._saving:
                await asyncio.to_thread(_replace, self._known_file, self._document())
        except OSError as exc:  # a full disk: removal works on from memory, the file catches up at the next save
            self._metrics.inc("storage_errors")
            log.error("homeassistant: cannot save %s: %s", self._known_file, exc)

    def save_now(self) -> None:
        """At shutdown: the silences as they are now (blocking, a small file)."""
        if self._remove_after > 0 and self._known_file is not None:
            try:
                _replace(self._known_file, self._document())
            except OSError as exc:
                log.error("homeassistant: cannot save %s: %s", self._known_file, exc)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
