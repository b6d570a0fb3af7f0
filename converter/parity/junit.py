"""JUnit XML of a parity run (`--junit FILE`): one test case per prompt case (logits) or benchmark
family (bench), a failure naming each check that failed (metric, value, limit, threshold source),
the run's settings as properties. Readable by any CI's JUnit publisher."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .judge import describe


def suite(name: str, properties: dict, cases: list[dict], seconds: float | None = None) -> ET.Element:
    """`cases`: {"name", "classname", "checks", "seconds"?, "out"?}; a case fails when a check did."""
    failed = sum(not all(c["ok"] for c in case["checks"]) for case in cases)
    element = ET.Element(
        "testsuite",
        name=name,
        tests=str(len(cases)),
        failures=str(failed),
        errors="0",
        skipped="0",
    )
    if seconds is not None:
        element.set("time", f"{seconds:.3f}")
    props = ET.SubElement(element, "properties")
    for key, value in properties.items():
        ET.SubElement(props, "property", name=key, value="" if value is None else str(value))
    for case in cases:
        testcase = ET.SubElement(element, "testcase", name=case["name"], classname=case["classname"])
        if case.get("seconds") is not None:
            testcase.set("time", f"{case['seconds']:.3f}")
        bad = [c for c in case["checks"] if not c["ok"]]
        if bad:
            failure = ET.SubElement(
                testcase, "failure", message="; ".join(describe(c) for c in bad), type="outside tolerance"
            )
            failure.text = "\n".join(describe(c) for c in case["checks"])
        out = ET.SubElement(testcase, "system-out")
        out.text = "\n".join([*(describe(c) for c in case["checks"]), *case.get("out", [])])
    return element


def write(path: Path, element: ET.Element) -> Path:
    root = ET.Element(
        "testsuites",
        name="parity-check",
        tests=element.get("tests"),
        failures=element.get("failures"),
        errors="0",
    )
    root.append(element)
    ET.indent(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _properties(report: dict, command: str) -> dict:
    keys = ("dtype", "tp", "pp", "device", "megatron_core", "torch", "transformers", "nvlm_port", "date")
    properties = {"command": f"parity-check {command}", "megatron": report["megatron"], "hf": report["hf"]}
    properties.update({key: report.get(key) for key in keys})
    properties["tolerances"] = (report.get("tolerance_sources") or {}).get("file") or "defaults"
    return properties


def logits_suite(report: dict) -> ET.Element:
    classname = f"parity.logits.{report['dtype']}.tp{report['tp']}pp{report['pp']}"
    cases = []
    for case in report["cases"]:
        out = [f"tokens {case['tokens']}, tiles {case['tiles']}, first jump {case.get('first_jump') or '-'}"]
        cases.append(
            {
                "name": case["name"],
                "classname": classname,
                "checks": case["checks"],
                "seconds": case.get("hf_seconds"),
                "out": out,
            }
        )
    name = f"parity-check logits {report['dtype']} TP={report['tp']} PP={report['pp']}"
    return suite(name, _properties(report, "logits"), cases, report["seconds"]["total"])


def bench_suite(report: dict) -> ET.Element:
    classname = f"parity.bench.{report['dtype']}.tp{report['tp']}pp{report['pp']}"
    cases = []
    for family, entry in report["benchmarks"].items():
        differing = [
            item["id"] for item in report["items"] if item["benchmark"] == family and not item["same_answer"]
        ]
        out = [
            f"{entry['metric']}, n {entry['n']}: Megatron {entry['megatron']:.1f}, HF {entry['hf']:.1f}, "
            f"majority baseline {entry['majority']:.1f}; items answered differently: {len(differing)}"
            + (f" ({', '.join(differing[:20])})" if differing else "")
        ]
        cases.append({"name": family, "classname": classname, "checks": entry["checks"], "out": out})
    name = f"parity-check bench {report['dtype']} TP={report['tp']} PP={report['pp']}"
    return suite(name, _properties(report, "bench"), cases, report.get("seconds", {}).get("total"))
