"""The device config's ``updates:`` section (remote model updates): where bundles come from, the
caps on a download, and the probation a new model must pass before it is committed."""

from __future__ import annotations

from pydantic import ConfigDict, Field, field_validator

from edge.numbers import NoBoolNumbers


class _Section(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid")


class ProbationSection(_Section):
    """What a new model must show before it is committed; any failure rolls back by itself."""

    frames: int = Field(default=200, ge=1, title="Frames",
                        description="Frames on the new model that end probation (or `minutes`, whichever first).")
    minutes: float = Field(default=60.0, gt=0, title="Minutes",
                           description="Time on the new model that ends probation, even with few frames.")
    max_errors: int = Field(default=3, ge=1, title="Errors",
                            description="Inference errors that roll back during probation.")
    max_crashes: int = Field(default=2, ge=1, title="Crashes",
                             description="Unclean restarts during probation (counted across restarts) that roll back.")
    max_latency_ms: float | None = Field(
        default=None, gt=0, title="Latency bound",
        description="Mean ms per frame above which the new model is rolled back; null = `latency_factor` "
        "times the old model's recent mean.")
    latency_factor: float = Field(default=3.0, gt=1, title="Latency factor",
                                  description="Slowdown against the old model that rolls back (when no bound).")
    max_empty_delta: float = Field(
        default=0.35, gt=0, le=1, title="Empty-rate change",
        description="Largest difference between the new model's empty-frame rate and the old model's recent "
        "rate; more means the new model sees a different world (e.g. misses every animal).")
    min_frames: int = Field(default=30, ge=1, title="Frames before rates",
                            description="Frames before the latency and empty-rate rules apply.")


class UpdatesSection(_Section):
    """Remote model updates (docs/updates.md); commands must be signed by a key in bundle.public_keys_dir."""

    enabled: bool = Field(default=True, title="Enabled", description="Accept signed update commands.")
    base_url: str | None = Field(
        default=None, title="Base URL",
        description="Where `camtrap-export publish` output is served (http or https); a command may name its "
        "own URL.")
    max_bundle_mb: float = Field(default=2048, gt=0, title="Bundle cap",
                                 description="Largest total download for one update, in MB.")
    timeout_s: float = Field(default=60, gt=0, title="Timeout",
                             description="Seconds without data before a download attempt gives up (it "
                             "resumes); a transfer that brings under 1 KiB in this many seconds is stalled and "
                             "gives up too.")
    attempts: int = Field(default=5, ge=1, title="Attempts", description="Tries per file (each one resumes).")
    probation: ProbationSection = Field(default_factory=ProbationSection, title="Probation",
                                        description="How a new model proves itself.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v

    @property
    def max_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)
