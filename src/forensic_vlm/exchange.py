"""The triage for the examiner's other tools: ``triage.csv`` and ``case.jsonld`` (CASE/UCO).

``triage.csv`` has the columns forensic suites and hash-set tools import (path, MD5, SHA-1,
SHA-256, size, category, confidence, needs review), one row per file in review order.

``case.jsonld`` is the triage in the CASE/UCO ontology (1.x, the version ``case_validate`` of
case-utils checks by default): the container (when there is one) and every file, with its hashes,
its path inside the container (a ``Contained_Within`` relationship with a ``PathRelationFacet``),
its times and allocation status; the classification as one investigative action and analysis, with
this tool, the base model and the adapter as its instruments; and one analytic result per scored
file with the predicted class and its confidence (``ArtifactClassificationResultFacet``). Node
identifiers are UUID 5 over the case and what each node is, so a rerun names the same file the
same way. Written with the standard library; case-utils is only needed to validate it.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path, PurePosixPath

from forensic_vlm.config import ClassSpec
from forensic_vlm.tables import write_atomically

#: triage.csv's columns, in order: what hash-set and review tools import.
CSV_COLUMNS = (
    "Path",
    "MD5",
    "SHA-1",
    "SHA-256",
    "Size",
    "Category",
    "Confidence",
    "Needs Review",
    "Category Name",
    "Status",
    "Deleted",
    "Partition",
    "Inode",
    "Modified UTC",
    "Reason",
)

CONTEXT = {
    "kb": "urn:forensic-vlm:kb:",
    "case-investigation": "https://ontology.caseontology.org/case/investigation/",
    "uco-action": "https://ontology.unifiedcyberontology.org/uco/action/",
    "uco-analysis": "https://ontology.unifiedcyberontology.org/uco/analysis/",
    "uco-core": "https://ontology.unifiedcyberontology.org/uco/core/",
    "uco-observable": "https://ontology.unifiedcyberontology.org/uco/observable/",
    "uco-tool": "https://ontology.unifiedcyberontology.org/uco/tool/",
    "uco-types": "https://ontology.unifiedcyberontology.org/uco/types/",
    "xsd": "http://www.w3.org/2001/XMLSchema#",
}


def write_triage_csv(path: Path, rows: list[dict]) -> None:
    """triage.csv: one row per file, in review order (UTF-8 with a byte-order mark, for spreadsheets)."""
    lines = []
    for row in rows:
        scored = row["status"] == "scored"
        lines.append(
            {
                "Path": row["path"],
                "MD5": row["md5"],
                "SHA-1": row["sha1"],
                "SHA-256": row["sha256"],
                "Size": row["size_bytes"],
                "Category": row["predicted"] if scored else "",
                "Category Name": row["predicted_en"] if scored else "",
                "Confidence": row["confidence"] if scored else "",
                "Needs Review": row["needs_review"],
                "Status": row["status"],
                "Deleted": row["deleted"],
                "Partition": row["partition"],
                "Inode": row["inode"],
                "Modified UTC": row["mtime_utc"],
                "Reason": "" if scored else row["reason"],
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(lines)
    write_atomically(path, ("\ufeff" + buffer.getvalue()).encode("utf-8"))


def write_case_jsonld(path: Path, rows: list[dict], *, custody: dict, classes: list[ClassSpec]) -> None:
    """case.jsonld: the triage as CASE/UCO (see the module's docstring)."""
    graph = CaseGraph(custody["case"])
    container = custody.get("container")
    container_id = graph.container(container) if container else None
    tool = graph.node(
        "tool",
        "forensic-vlm",
        {
            "@type": "uco-tool:AnalyticTool",
            "uco-core:name": "forensic-vlm",
            "uco-tool:toolType": "image classification (LLaVA with a QLoRA adapter)",
            "uco-tool:version": custody["versions"].get("forensic-vlm", ""),
        },
    )
    model = custody["model"]
    instruments = [tool, graph.model("model", model["name_or_path"], model["files_sha256"], "base model")]
    if custody.get("adapter"):
        adapter = custody["adapter"]
        instruments.append(graph.model("adapter", adapter["path"], adapter["files_sha256"], "fine-tuned LoRA adapter"))
    action = graph.identifier("action", custody["started_utc"])
    files, results = [], []
    for row in rows:
        file_id = graph.file(row, container_id)
        files.append({"@id": file_id})
        if row["status"] == "scored":
            results.append({"@id": graph.result(row, file_id, action, classes)})
    graph.nodes.append(
        {
            "@id": action,
            "@type": ["case-investigation:InvestigativeAction", "uco-analysis:Analysis"],
            "uco-core:name": "triage classification",
            "uco-core:description": f"Classification of every image of case {custody['case']} into "
            + ", ".join(f"{c.id} {c.en}" for c in classes),
            "uco-action:startTime": _datetime(custody["started_utc"]),
            "uco-action:endTime": _datetime(custody["finished_utc"]),
            "uco-action:instrument": [{"@id": i} for i in instruments],
            "uco-action:object": ([{"@id": container_id}] if container_id else []) + files,
            "uco-action:result": results,
        }
    )
    document = {"@context": CONTEXT, "@graph": graph.nodes}
    write_atomically(path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


class CaseGraph:
    """Nodes of one case.jsonld, each with a UUID 5 identifier."""

    def __init__(self, case: str) -> None:
        self.namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:forensic-vlm:case:{case}")
        self.nodes: list[dict] = []

    def identifier(self, kind: str, key: str) -> str:
        return f"kb:{kind}-{uuid.uuid5(self.namespace, f'{kind}:{key}')}"

    def node(self, kind: str, key: str, body: dict) -> str:
        node_id = self.identifier(kind, key)
        self.nodes.append({"@id": node_id, **body})
        return node_id

    def facet(self, kind: str, key: str, body: dict) -> dict:
        return {"@id": self.identifier(kind, key), **body}

    def hashes(self, key: str, values: dict[str, str]) -> list[dict]:
        names = {"md5": "MD5", "sha1": "SHA1", "sha256": "SHA256"}
        return [
            {
                "@id": self.identifier("hash", f"{key}:{name}"),
                "@type": "uco-types:Hash",
                "uco-types:hashMethod": names[name],  # a string since UCO 1.4 (HashNameVocab's names)
                "uco-types:hashValue": {"@type": "xsd:hexBinary", "@value": value},
            }
            for name, value in values.items()
            if value
        ]

    def model(self, kind: str, name: str, files_sha256: str, role: str) -> str:
        return self.node(
            kind,
            name,
            {
                "@type": "uco-tool:AnalyticTool",
                "uco-core:name": str(name),
                "uco-tool:toolType": role,
                "uco-core:description": f"files sha256 {files_sha256} (the digest of its files' listing, verified "
                "before loading)",
            },
        )

    def container(self, record: dict) -> str:
        key = record["path"]
        verified = record.get("computed_hashes") or {}
        facets = [
            self.facet(
                "file-facet",
                key,
                {
                    "@type": "uco-observable:FileFacet",
                    "uco-observable:fileName": PurePosixPath(record["path"]).name,
                    "uco-observable:filePath": record["path"],
                    "uco-observable:sizeInBytes": record["size_bytes"],
                },
            )
        ]
        if verified:
            facets.append(
                self.facet(
                    "content-facet",
                    key,
                    {"@type": "uco-observable:ContentDataFacet", "uco-observable:hash": self.hashes(key, verified)},
                )
            )
        return self.node(
            "container",
            key,
            {
                "@type": "uco-observable:File",
                "uco-core:description": f"evidence container ({record['format']}); {len(record['segments'])} "
                f"segment(s); hashes of its media data: {record['verified']}",
                "uco-core:hasFacet": facets,
            },
        )

    def file(self, row: dict, container_id: str | None) -> str:
        key = f"{row['partition']}|{row['path']}|{row['inode']}"
        file_facet = {
            "@type": "uco-observable:FileFacet",
            "uco-observable:fileName": PurePosixPath(row["path"]).name,
            "uco-observable:filePath": row["path"],
            "uco-observable:extension": PurePosixPath(row["path"]).suffix.lstrip("."),
            "uco-observable:isDirectory": False,
            "uco-observable:allocationStatus": "unallocated (deleted)" if row["deleted"] == "true" else "allocated",
        }
        if row["size_bytes"] != "":
            file_facet["uco-observable:sizeInBytes"] = int(row["size_bytes"])
        for column, prop in (
            ("created_utc", "observableCreatedTime"),
            ("mtime_utc", "modifiedTime"),
            ("accessed_utc", "accessedTime"),
            ("changed_utc", "metadataChangeTime"),
        ):
            if row[column]:
                file_facet[f"uco-observable:{prop}"] = _datetime(row[column])
        facets = [self.facet("file-facet", key, file_facet)]
        hashes = {name: row[name] for name in ("md5", "sha1", "sha256")}
        if any(hashes.values()):
            facets.append(
                self.facet(
                    "content-facet",
                    key,
                    {"@type": "uco-observable:ContentDataFacet", "uco-observable:hash": self.hashes(key, hashes)},
                )
            )
        node = {"@type": "uco-observable:File", "uco-core:hasFacet": facets}
        if row["status"] != "scored":
            node["uco-core:description"] = f"not scored: {row['reason']}: {row['message']}"
        file_id = self.node("file", key, node)
        if container_id:
            self.node(
                "contained-within",
                key,
                {
                    "@type": "uco-observable:ObservableRelationship",
                    "uco-core:source": {"@id": file_id},
                    "uco-core:target": {"@id": container_id},
                    "uco-core:kindOfRelationship": "Contained_Within",
                    "uco-core:isDirectional": True,
                    "uco-core:hasFacet": [
                        self.facet(
                            "path-facet",
                            key,
                            {"@type": "uco-observable:PathRelationFacet", "uco-observable:path": row["path"]},
                        )
                    ],
                },
            )
        return file_id

    def result(self, row: dict, file_id: str, action: str, classes: list[ClassSpec]) -> str:
        key = f"{row['partition']}|{row['path']}|{row['inode']}"
        by_id = {c.id: c for c in classes}
        predicted = by_id[int(row["predicted"])]
        classification = {
            "@id": self.identifier("classification", key),
            "@type": "uco-analysis:ArtifactClassification",
            "uco-analysis:class": f"{predicted.id} {predicted.en} ({predicted.ko})",
            "uco-analysis:classificationConfidence": {"@type": "xsd:decimal", "@value": row["confidence"]},
        }
        review = "needs review" if row["needs_review"] == "true" else "above its class's review threshold"
        return self.node(
            "result",
            key,
            {
                "@type": ["uco-analysis:AnalyticResult", "uco-core:Annotation"],
                "uco-core:object": [{"@id": file_id}],
                "uco-core:statement": f"class {predicted.id} {predicted.en}, confidence {row['confidence']}, {review}",
                "uco-core:tag": ["needs review"] if row["needs_review"] == "true" else [],
                "uco-analysis:originatingAnalysis": {"@id": action},
                "uco-core:hasFacet": [
                    self.facet(
                        "classification-facet",
                        key,
                        {
                            "@type": "uco-analysis:ArtifactClassificationResultFacet",
                            "uco-analysis:classification": [classification],
                        },
                    )
                ],
            },
        )


def _datetime(text: str) -> dict:
    return {"@type": "xsd:dateTime", "@value": text}
