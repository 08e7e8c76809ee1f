"""Request and response models of the service: every field typed and bounded (issue 9, section 1).

A request that breaks a bound gets BentoML's 400 with ``detail[].loc`` naming the field; the
cross-field rules (prompt and / or findings, the work budget) are model validators, so they name
their fields too.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.feedback.models import CRITERIA
from training.findings import KINDS, LOBES
from training.generation import SCHEDULERS

MAX_PROMPT = 1000  # characters; IU / MIMIC impressions are far shorter
MAX_SEED = 2**31 - 1
Key = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:@/+=-]+$")]
RaterId = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.@-]+$")]


class Limits:
    """Server-side limits that depend on the configuration (set once at start-up)."""

    max_work: float = 16 * 50 * 256 * 256  # n x steps x pixels of one /generate call
    max_job_work: float = 10_000 * 50 * 256 * 256  # count x steps x pixels of one augmentation batch


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class FindingIn(Strict):
    kind: Literal[tuple(sorted(KINDS))]  # type: ignore[valid-type]
    side: Optional[Literal["left", "right", "bilateral"]] = None
    severity: Optional[Literal["small", "moderate", "large"]] = None
    lobe: Optional[Literal[tuple(sorted(LOBES))]] = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _consistent(self) -> "FindingIn":
        from training.findings import Finding

        Finding(self.kind, self.side, self.severity, self.lobe)  # ValueError names what does not fit
        return self


class Sampling(Strict):
    steps: int = Field(25, ge=1, le=100, description="sampling steps")
    guidance: float = Field(4.0, ge=0.0, le=20.0, description="classifier-free guidance scale")
    scheduler: Literal[tuple(sorted(SCHEDULERS))] = "ddim"  # type: ignore[valid-type]
    size: Optional[int] = Field(None, ge=64, le=512, multiple_of=8, description="image side (default: the model's)")

    def check_work(self, count: int, what: str, budget: float, advice: str) -> None:
        """ValueError when count x steps x size^2 passes the budget (no size given counts as 256 px)."""
        size = self.size or 256
        work = count * self.steps * size * size
        if work > budget:
            raise ValueError(f"{what} x steps x size^2 = {work:.3g} exceeds this server's budget {budget:.3g}: "
                             f"{advice}")


class GenerateRequest(Sampling):
    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT, description="report text")
    findings: Optional[list[FindingIn]] = Field(None, max_length=8, description="structured findings")
    n: int = Field(1, ge=1, le=16, description="images, seeds seed .. seed + n - 1")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="default: random, reported per image")
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    format: Literal["png", "dicom"] = "png"
    score: bool = Field(True, description="score each image with the reward models")
    key: Optional[Key] = Field(None, description="idempotency key: a retry returns the stored images")

    @model_validator(mode="after")
    def _prompt_or_findings(self) -> "GenerateRequest":
        if not (self.prompt and self.prompt.strip()) and not self.findings:
            raise ValueError("give a prompt, findings, or both")
        self.check_work(self.n, "n", Limits.max_work, "ask for fewer images, steps or pixels")
        return self


class PngRequest(GenerateRequest):
    n: int = Field(1, ge=1, le=1, description="one image")
    format: Literal["png"] = "png"


class ImageOut(BaseModel):
    id: int = Field(description="generation id in the feedback store: rate or compare it by this id")
    seed: int
    media_type: str
    image: str = Field(description="base64 PNG or DICOM, with cxrgen's provenance inside")
    scores: dict[str, float] = Field(description="reward scores in [0, 1] and their weighted 'combined'")
    finding_agreement: dict[str, float] = Field(
        description="per CheXpert observation: the diagnosis reward's agreement with the prompt "
                    "(p if the prompt declares it, 1 - p if not)")


class GenerateResponse(BaseModel):
    model_version: str
    prompt: str
    findings: list[dict]
    images: list[ImageOut]


class RatingIn(Strict):
    generation_id: int = Field(ge=1, le=2**62)
    rater_id: RaterId
    plausible: bool
    failed: list[Literal[CRITERIA]] = Field(default_factory=list, max_length=len(CRITERIA))  # type: ignore[valid-type]
    score: Optional[int] = Field(None, ge=1, le=5)
    comment: str = Field("", max_length=2000)
    key: Optional[Key] = None

    @field_validator("failed")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("failed criteria must not repeat")
        return v


class ComparisonIn(Strict):
    generation_a: int = Field(ge=1, le=2**62)
    generation_b: int = Field(ge=1, le=2**62)
    preferred: Literal["a", "b", "tie"]
    rater_id: RaterId
    key: Optional[Key] = None

    @model_validator(mode="after")
    def _two(self) -> "ComparisonIn":
        if self.generation_a == self.generation_b:
            raise ValueError("generation_a and generation_b must differ")
        return self


class AugmentRequest(Sampling):
    count: int = Field(ge=1, le=10_000, description="images to deliver")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    labels: Optional[dict[Annotated[str, Field(max_length=64)], Annotated[float, Field(ge=0, le=1e6)]]] = Field(
        None, max_length=32, description="finding kind (or no_finding) -> weight")
    prompts: Optional[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]]] = Field(
        None, max_length=1000, description="or: prompts to cycle through")
    min_plausibility: Optional[float] = Field(None, ge=0.0, le=1.0, description="reject images scoring below")

    @model_validator(mode="after")
    def _spec(self) -> "AugmentRequest":
        self.to_spec().validate()  # ValueError names the field
        self.check_work(self.count, "count", Limits.max_job_work, "split the batch or ask for fewer steps or pixels")
        return self

    def to_spec(self):
        from training.augment import AugmentSpec

        return AugmentSpec(count=self.count, seed=self.seed, labels=self.labels, prompts=self.prompts,
                           min_plausibility=self.min_plausibility, steps=self.steps, guidance=self.guidance,
                           scheduler=self.scheduler, size=self.size)


class ReloadRequest(Strict):
    source: str = Field(min_length=1, max_length=1000,
                        description="a checkpoint folder on the server, or bento:<tag> from the BentoML model store")
