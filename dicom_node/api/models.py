"""What the REST API accepts and returns: pydantic models, so FastAPI validates them (422 saying what is wrong) and
documents them in the OpenAPI schema at ``/docs``."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.index.base import SearchFilters

DA_PATTERN = r"^\d{8}$"
MAX_TEXT_CHARACTERS = 100_000


class FilterFields(BaseModel):
    """Payload filters every search takes (None = no restriction); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    modality: str | None = Field(None, max_length=16, description="e.g. CT")
    body_part: str | None = Field(None, max_length=64, description="BodyPartExamined, e.g. CHEST")
    study_date_from: str | None = Field(None, pattern=DA_PATTERN, description="YYYYMMDD, inclusive")
    study_date_to: str | None = Field(None, pattern=DA_PATTERN, description="YYYYMMDD, inclusive")
    sex: Literal["M", "F", "O"] | None = None
    age_band: str | None = Field(None, max_length=16, description="as in the index: 40-49, 90+")
    institution: str | None = Field(None, max_length=64)

    @field_validator("study_date_from", "study_date_to")
    @classmethod
    def _calendar_date(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                date(int(value[:4]), int(value[4:6]), int(value[6:]))
            except ValueError:
                raise ValueError(f"{value} is not a calendar date (YYYYMMDD)") from None
        return value

    @model_validator(mode="after")
    def _ordered_range(self) -> FilterFields:
        if self.study_date_from and self.study_date_to and self.study_date_from > self.study_date_to:
            raise ValueError(f"study_date_from {self.study_date_from} is after study_date_to {self.study_date_to}")
        return self

    def search_filters(self) -> SearchFilters | None:
        values = self.model_dump(include=set(FilterFields.model_fields), exclude_none=True)
        return SearchFilters(**values) if values else None


class Paging(BaseModel):
    """``limit`` None means the configured default; the configured maximum is checked by the route."""

    limit: int | None = Field(None, ge=1, description="results per page (default query.default_limit, "
                                                      "at most query.max_limit)")
    offset: int = Field(0, ge=0, le=10_000, description="results skipped (ranks continue: offset 10 -> rank 11)")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="drop results scoring below this")


class SimilarQuery(FilterFields, Paging):
    """Query string of ``GET /studies/{uid}/similar``."""

    include_same_patient: bool = Field(False, description="also return the query patient's other studies")


class SearchRequest(Paging):
    """Body of ``POST /search``: report or free text (or a finding name alone)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1, max_length=MAX_TEXT_CHARACTERS)
    filters: FilterFields | None = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value


class ResultItem(BaseModel):
    rank: int
    score: float
    study_instance_uid: str
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part: str | None = None
    has_report: bool = False
    patient_name: str | None = Field(None, description="only where query.return_patient_identity allows")
    patient_id: str | None = Field(None, description="only where query.return_patient_identity allows")


class SearchResponse(BaseModel):
    query: dict[str, Any]
    bundle_id: str
    results: list[ResultItem]


class StudySummary(BaseModel):
    """One study the node holds: its processing state and the attributes read from its first instance."""

    study_instance_uid: str
    state: str
    reason: str | None = None
    version: int
    n_instances: int
    calling_ae: str | None = None
    first_received: str
    last_received: str
    indexed_series_uid: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modalities_in_study: list[str] = Field(default_factory=list)
    number_of_series: int | None = None
    patient_name: str | None = Field(None, description="only where query.return_patient_identity allows")
    patient_id: str | None = Field(None, description="only where query.return_patient_identity allows")


class StudyList(BaseModel):
    total: int
    studies: list[StudySummary]


class ReportAccepted(BaseModel):
    study_instance_uid: str
    characters: int
    source: Literal["rest"] = "rest"


class Health(BaseModel):
    status: Literal["ok", "degraded", "no_bundle"]  # no_bundle: alive and receiving, queries answer 503
    bundle_id: str | None = None
    indexed: int | None = None
