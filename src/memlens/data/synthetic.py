"""A seeded synthetic pharmacovigilance corpus: PHEE-like case-report sentences with known annotated fields.

Every sentence records where each field (age, sex, drug, dose, route, indication, adverse effect) sits in its text,
under PHEE's role names, so that leakage measures have ground truth. The corpus is the offline default of the demo.
"""

from __future__ import annotations

import random
import re

from memlens.data.records import Event, Record, Span
from memlens.data.phee import fields_of

# Role of each template slot, named as in PHEE.
ROLES = {
    "age": "subject.age",
    "sex": "subject.gender",
    "drug": "treatment.drug",
    "dose": "treatment.dosage",
    "route": "treatment.route",
    "indication": "treatment.disorder",
    "effect": "effect",
}

DRUGS = (
    "amiodarone", "allopurinol", "carbamazepine", "ciprofloxacin", "clozapine", "cyclosporine", "dapsone",
    "digoxin", "doxycycline", "enalapril", "fluoxetine", "gabapentin", "haloperidol", "heparin", "hydralazine",
    "ibuprofen", "isoniazid", "lamotrigine", "levetiracetam", "lisinopril", "lithium", "losartan", "methotrexate",
    "metformin", "metoclopramide", "minocycline", "naproxen", "nitrofurantoin", "olanzapine", "omeprazole",
    "paroxetine", "phenytoin", "pioglitazone", "prednisone", "propylthiouracil", "quetiapine", "rifampicin",
    "risperidone", "sertraline", "simvastatin", "sulfasalazine", "tacrolimus", "tamoxifen", "terbinafine",
    "valproate", "vancomycin", "venlafaxine", "warfarin", "zidovudine", "azathioprine",
)
EFFECTS = (
    "acute hepatitis", "agranulocytosis", "anaphylaxis", "aplastic anemia", "acute kidney injury", "bradycardia",
    "cholestatic jaundice", "drug rash with eosinophilia", "erythema multiforme", "fulminant hepatic failure",
    "hyperkalemia", "hyponatremia", "interstitial nephritis", "lactic acidosis", "leukopenia", "lupus-like syndrome",
    "neuroleptic malignant syndrome", "pancreatitis", "photosensitivity", "pneumonitis", "QT prolongation",
    "rhabdomyolysis", "seizures", "serotonin syndrome", "Stevens-Johnson syndrome", "tardive dyskinesia",
    "thrombocytopenia", "toxic epidermal necrolysis", "torsades de pointes", "vasculitis", "visual hallucinations",
    "angioedema", "hypoglycemia", "myocarditis", "optic neuritis", "peripheral neuropathy",
)
INDICATIONS = (
    "atrial fibrillation", "bipolar disorder", "chronic gout", "depression", "epilepsy", "heart failure",
    "hypertension", "hypothyroidism", "Graves disease", "major depression", "pneumonia", "psoriasis",
    "rheumatoid arthritis", "schizophrenia", "tuberculosis", "type 2 diabetes", "urinary tract infection",
    "acne vulgaris", "breast cancer", "Crohn disease", "onychomycosis", "renal transplantation", "HIV infection",
    "leprosy", "osteoarthritis", "hypercholesterolemia", "deep vein thrombosis", "neuropathic pain",
)
ROUTES = ("oral", "intravenous", "intramuscular", "subcutaneous", "topical", "inhaled")
DOSE_UNITS = ("mg daily", "mg twice daily", "mg/day", "mg/kg/day", "mg every 8 hours", "micrograms daily")
SEX_ADULT = ("man", "woman", "male patient", "female patient")
SEX_CHILD = ("boy", "girl")

TEMPLATES = (
    "A {age}-year-old {sex} developed {effect} after receiving {route} {drug} {dose} for {indication}.",
    "We report a case of {effect} in a {age}-year-old {sex} treated with {drug} {dose} for {indication}.",
    "{Drug}-induced {effect} in a {age}-year-old {sex} with {indication}.",
    "A {age}-year-old {sex} with {indication} presented with {effect} {days} days after starting {route} {drug}"
    " at {dose}.",
    "{effect_cap} occurred in a {age}-year-old {sex} receiving {drug} ({dose}, {route}) for {indication}.",
    "CASE: A {age}-year-old {sex} on {route} {drug} {dose} for {indication} was admitted with {effect}.",
    "OBJECTIVE: To describe {effect} associated with {drug} therapy for {indication} in a {age}-year-old {sex}.",
    "Within {days} days of {route} {drug} {dose} for {indication}, a {age}-year-old {sex} developed {effect}.",
    "{effect_cap} is a rare complication of {drug}, reported here in a {age}-year-old {sex} treated for"
    " {indication} with {dose}.",
    "After the dose of {drug} was increased to {dose}, a {age}-year-old {sex} with {indication} had {effect}.",
)
_SLOT = re.compile(r"\{(\w+)\}")
# Slots rendered from a field value but written differently (capitalised) in the text; the span keeps the text.
_ALIASES = {"Drug": "drug", "effect_cap": "effect"}


def _draw_values(rng: random.Random) -> dict[str, str]:
    age = rng.choice((rng.randint(2, 17), rng.randint(18, 89), rng.randint(18, 89)))
    amount = rng.choice((0.5, 1, 2, 5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 1000))
    return {
        "age": str(age),
        "sex": rng.choice(SEX_CHILD if age < 18 else SEX_ADULT),
        "drug": rng.choice(DRUGS),
        "dose": f"{amount:g} {rng.choice(DOSE_UNITS)}",
        "route": rng.choice(ROUTES),
        "indication": rng.choice(INDICATIONS),
        "effect": rng.choice(EFFECTS),
        "days": str(rng.randint(2, 60)),
    }


def render(template: str, values: dict[str, str]) -> tuple[str, list[Span]]:
    """Fill a template, returning the text and the span of every slot that carries an annotated field."""
    out, spans, pos = [], [], 0
    for m in _SLOT.finditer(template):
        out.append(template[pos : m.start()])
        slot = m.group(1)
        field = _ALIASES.get(slot, slot)
        value = values[field]
        if slot == "Drug":
            value = value[:1].upper() + value[1:]
        elif slot == "effect_cap":
            value = value[:1].upper() + value[1:]
        start = sum(len(s) for s in out)
        out.append(value)
        if field in ROLES:
            spans.append(Span(role=ROLES[field], text=value, start=start))
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), spans


def generate(n: int, seed: int = 0) -> list[Record]:
    """``n`` distinct sentences, the same for the same seed."""
    rng = random.Random(seed)
    records, seen = [], set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError("synthetic corpus: too many duplicate sentences")
        text, spans = render(rng.choice(TEMPLATES), _draw_values(rng))
        if text in seen:
            continue
        seen.add(text)
        events = (Event(event_type="Adverse_event", spans=tuple(spans)),)
        records.append(Record(id=f"syn-{len(records):05d}", text=text, events=events, fields=fields_of(events)))
    return records


def load(n: int = 4827, seed: int = 0) -> dict[str, list[Record]]:
    """The synthetic corpus split like PHEE (60% train, 20% dev, 20% test)."""
    records = generate(n, seed)
    n_train, n_dev = round(0.6 * n), round(0.2 * n)
    bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
    return {
        split: [Record(r.id, r.text, split, r.events, r.fields) for r in records[a:b]]
        for split, (a, b) in bounds.items()
    }
