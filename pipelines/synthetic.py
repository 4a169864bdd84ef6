"""Deterministic synthetic radiology reports for the demo, the tests and the benchmarks.

Report `i` of a run is a pure function of `(seed, i)`: a private `random.Random` is re-seeded for
every report, so workers can generate disjoint index ranges (`start`) and reruns are identical.
Nothing is held in memory beyond one report (or one write chunk).

A report is a free-text document: a header full of PHI in varied layouts, then EXAM / HISTORY /
TECHNIQUE / COMPARISON / FINDINGS / IMPRESSION sections with varied header spellings. Findings are
composed per body region from "topics" (lungs, pleura, ...); each topic states either a normal
sentence or one abnormal finding, and every abnormal finding has a matching impression sentence,
so the impression really follows from the findings.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Callable, Iterator, Literal

Format = Literal["jsonl", "csv", "parquet"]
FIELDS = ("id", "exam_code", "modality", "text")
DEFECTS = ("no_findings", "no_impression", "short_findings")

# ---------------------------------------------------------------- exams
# (code, modality, region, description, laterality). Modality uses DICOM-style abbreviations;
# computed radiography ("CR...") codes are X-ray exams too.
EXAMS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("CTCHWO", "CT", "chest_ct", "CT CHEST WITHOUT CONTRAST", None),
    ("CTCHW", "CT", "chest_ct", "CT CHEST WITH CONTRAST", None),
    ("CTAPECH", "CT", "chest_cta", "CTA CHEST PULMONARY EMBOLISM PROTOCOL", None),
    ("CTAPW", "CT", "abdomen", "CT ABDOMEN AND PELVIS WITH CONTRAST", None),
    ("CTAPWO", "CT", "abdomen", "CT ABDOMEN AND PELVIS WITHOUT CONTRAST", None),
    ("CTHDWO", "CT", "head", "CT HEAD WITHOUT CONTRAST", None),
    ("CTCSWO", "CT", "cspine", "CT CERVICAL SPINE WITHOUT CONTRAST", None),
    ("CTCACS", "CT", "cardiac_ct", "CT CARDIAC CALCIUM SCORING", None),
    ("CTACOR", "CT", "cardiac_ct", "CTA CORONARY ARTERIES WITH CONTRAST", None),
    ("MRBRWWO", "MR", "head", "MRI BRAIN WITH AND WITHOUT CONTRAST", None),
    ("MRBRWO", "MR", "head", "MRI BRAIN WITHOUT CONTRAST", None),
    ("MRCSWO", "MR", "cspine", "MRI CERVICAL SPINE WITHOUT CONTRAST", None),
    ("MRLSWO", "MR", "lspine", "MRI LUMBAR SPINE WITHOUT CONTRAST", None),
    ("MRKNLWO", "MR", "knee_mr", "MRI LEFT KNEE WITHOUT CONTRAST", "left"),
    ("MRKNRWO", "MR", "knee_mr", "MRI RIGHT KNEE WITHOUT CONTRAST", "right"),
    ("MRSHRWO", "MR", "shoulder_mr", "MRI RIGHT SHOULDER WITHOUT CONTRAST", "right"),
    ("MRSHLWO", "MR", "shoulder_mr", "MRI LEFT SHOULDER WITHOUT CONTRAST", "left"),
    ("MRABWWO", "MR", "abdomen", "MRI ABDOMEN WITH AND WITHOUT CONTRAST", None),
    ("MRCARDW", "MR", "cardiac_mr", "MRI CARDIAC MORPHOLOGY AND FUNCTION WITH CONTRAST", None),
    ("XRCH2V", "XR", "chest_xr", "XR CHEST 2 VIEWS PA AND LATERAL", None),
    ("CRCHPORT", "XR", "chest_xr", "XR CHEST 1 VIEW PORTABLE", None),
    ("XRKNL3V", "XR", "knee_xr", "XR LEFT KNEE 3 VIEWS", "left"),
    ("XRKNR3V", "XR", "knee_xr", "XR RIGHT KNEE 3 VIEWS", "right"),
    ("XRSHR2V", "XR", "shoulder_xr", "XR RIGHT SHOULDER 2 VIEWS", "right"),
    ("XRWRL3V", "XR", "wrist_xr", "XR LEFT WRIST 3 VIEWS", "left"),
    ("XRWRR3V", "XR", "wrist_xr", "XR RIGHT WRIST 3 VIEWS", "right"),
    ("XRLS3V", "XR", "lspine", "XR LUMBAR SPINE 3 VIEWS", None),
    ("RFUGI", "RF", "ugi", "FL UPPER GI SERIES WITH AIR CONTRAST", None),
    ("RFESO", "RF", "ugi", "FL ESOPHAGRAM", None),
    ("RFSBFT", "RF", "small_bowel", "FL SMALL BOWEL FOLLOW THROUGH", None),
    ("RFBE", "RF", "colon", "FL BARIUM ENEMA DOUBLE CONTRAST", None),
    ("RFVCUG", "RF", "vcug", "FL VOIDING CYSTOURETHROGRAM", None),
)

# ---------------------------------------------------------------- findings library
# A topic is (label, normal sentences, abnormal findings); an abnormal finding is
# (findings template, impression template). Templates use the slots defined in SLOTS/DERIVED.
Topic = tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]

_LUNG_CT: Topic = ("Lungs", (
    "The lungs are clear without focal consolidation.",
    "No suspicious pulmonary nodule or mass. The airways are patent.",
), (
    ("There is a {size} cm solid nodule in the {lobe}.",
     "{size} cm {lobe} pulmonary nodule; recommend follow-up CT in {fu}."),
    ("Patchy consolidation with air bronchograms is present in the {lobe}.",
     "Consolidation in the {lobe}, compatible with pneumonia in the appropriate clinical setting."),
    ("A spiculated {big} cm mass in the {lobe} abuts the pleura.",
     "Spiculated {big} cm {lobe} mass, suspicious for primary lung malignancy; tissue sampling is recommended."),
    ("Moderate centrilobular emphysema is present, most pronounced in the upper lobes.",
     "Moderate centrilobular emphysema."),
))
_PLEURA: Topic = ("Pleura", (
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion. No pneumothorax is seen.",
), (
    ("There is a {sev} {side} pleural effusion with adjacent compressive atelectasis.",
     "{sev} {side} pleural effusion."),
    ("A small {side} apical pneumothorax measures {mm} mm.",
     "Small {side} apical pneumothorax."),
))
_MEDIASTINUM: Topic = ("Heart and mediastinum", (
    "Heart size is normal without pericardial effusion.",
    "No mediastinal or hilar lymphadenopathy. The heart is not enlarged.",
), (
    ("An enlarged {side} hilar lymph node measures {size} cm in short axis.",
     "{side} hilar lymphadenopathy measuring {size} cm."),
    ("The heart is enlarged. There is a small pericardial effusion.",
     "Cardiomegaly with a small pericardial effusion."),
))
_PULM_ARTERIES: Topic = ("Pulmonary arteries", (
    "The pulmonary arteries opacify well without filling defect to suggest pulmonary embolism.",
), (
    ("Filling defects are present within the {side} lower lobe segmental pulmonary arteries.",
     "Acute {side} lower lobe segmental pulmonary embolism."),
))
_THORACIC_BONES: Topic = ("Bones", (
    "No aggressive osseous lesion.",
    "The osseous structures are intact.",
), (
    ("Compression deformity of the {tvert} vertebral body with approximately {pct} height loss.",
     "{tvert} compression deformity with {pct} height loss."),
))
_UPPER_ABDOMEN: Topic = ("Upper abdomen", (
    "The included upper abdomen is unremarkable.",
), (
    ("A {size} cm hypodense lesion in hepatic segment {seg} is too small to characterize.",
     "Indeterminate {size} cm lesion in hepatic segment {seg}."),
))
_HEART_XR: Topic = ("Heart", (
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size is normal. The mediastinal contours are unremarkable.",
), (
    ("The cardiac silhouette is enlarged.", "Cardiomegaly."),
))
_LUNG_XR: Topic = ("Lungs", (
    "The lungs are clear. No focal airspace opacity.",
    "Lungs are well expanded and clear.",
), (
    ("Patchy airspace opacity is present in the {lobe}.",
     "{lobe} airspace opacity, which may represent pneumonia."),
    ("A {size} cm nodular opacity projects over the {lobe}.",
     "{size} cm nodular opacity in the {lobe}; CT chest is recommended for further evaluation."),
    ("Diffuse interstitial opacities and Kerley B lines are present with vascular congestion.",
     "Interstitial pulmonary edema."),
))
_RIBS_XR: Topic = ("Bones", (
    "The visualized osseous structures are intact.",
), (
    ("There is an acute nondisplaced fracture of the {side} {rib} rib.",
     "Acute {side} {rib} rib fracture."),
))
_LIVER: Topic = ("Liver", (
    "The liver is normal in size and attenuation without focal lesion.",
), (
    ("A {size} cm arterially enhancing lesion is present in hepatic segment {seg}.",
     "{size} cm enhancing lesion in hepatic segment {seg}; multiphase MRI is recommended."),
    ("There is diffuse hypoattenuation of the liver parenchyma.", "Hepatic steatosis."),
))
_GALLBLADDER: Topic = ("Gallbladder", (
    "The gallbladder is unremarkable. No biliary ductal dilatation.",
), (
    ("Multiple gallstones are present without gallbladder wall thickening or pericholecystic fluid.",
     "Cholelithiasis without evidence of acute cholecystitis."),
))
_SOLID_ORGANS: Topic = ("Pancreas, spleen, adrenals", (
    "The pancreas, spleen, and adrenal glands are unremarkable.",
), (
    ("A {size} cm {side} adrenal nodule measures less than 10 Hounsfield units.",
     "{size} cm {side} adrenal adenoma."),
))
_KIDNEYS: Topic = ("Kidneys", (
    "The kidneys enhance symmetrically without hydronephrosis.",
    "No renal calculi or hydronephrosis.",
), (
    ("A {mm} mm calculus at the {side} ureterovesical junction causes moderate hydronephrosis.",
     "{mm} mm obstructing {side} ureterovesical junction calculus with moderate hydronephrosis."),
    ("A {size} cm simple cyst arises from the {side} kidney (Bosniak I).",
     "{side} Bosniak I renal cyst; no follow-up needed."),
))
_BOWEL: Topic = ("Bowel", (
    "No bowel obstruction or bowel wall thickening. The appendix is normal.",
), (
    ("The appendix is dilated to {mm} mm with periappendiceal fat stranding.", "Acute appendicitis."),
    ("Sigmoid diverticula with wall thickening and pericolonic fat stranding.",
     "Acute uncomplicated sigmoid diverticulitis."),
    ("Mural thickening and hyperenhancement of the terminal ileum with comb sign.",
     "Active terminal ileitis, consistent with a Crohn disease flare."),
))
_AORTA: Topic = ("Vessels and lymph nodes", (
    "The abdominal aorta is normal in caliber. No lymphadenopathy.",
), (
    ("The infrarenal abdominal aorta is aneurysmal, measuring {big} cm.",
     "{big} cm infrarenal abdominal aortic aneurysm."),
))
_PELVIS: Topic = ("Pelvis", (
    "The urinary bladder is unremarkable. No free fluid.",
), ())
_BRAIN: Topic = ("Brain", (
    "No acute intracranial hemorrhage, mass effect, or midline shift.",
    "Gray-white matter differentiation is preserved. No mass effect.",
), (
    ("Acute intraparenchymal hemorrhage in the {side} {brainlobe} lobe measures {size} cm.",
     "Acute {size} cm {side} {brainlobe} intraparenchymal hemorrhage."),
    ("Loss of gray-white differentiation in the {side} middle cerebral artery territory.",
     "Acute {side} MCA territory infarct."),
    ("Patchy periventricular white matter changes, likely chronic small vessel ischemic change.",
     "Chronic small vessel ischemic disease."),
    ("A {size} cm extra-axial mass along the {side} frontal convexity has a dural tail.",
     "{size} cm {side} frontal convexity extra-axial mass, likely meningioma."),
))
_VENTRICLES: Topic = ("Ventricles", (
    "The ventricles and sulci are normal in size for age.",
), (
    ("The ventricles are enlarged out of proportion to the sulci.",
     "Ventriculomegaly out of proportion to sulcal enlargement; normal pressure hydrocephalus may be considered."),
))
_EXTRA_AXIAL: Topic = ("Extra-axial spaces", (
    "No extra-axial fluid collection.",
), (
    ("A {mm} mm {side} holohemispheric subdural hematoma is present.", "{mm} mm {side} subdural hematoma."),
))
_SINUSES: Topic = ("Sinuses and calvarium", (
    "The visualized paranasal sinuses and mastoid air cells are clear. The calvarium is intact.",
), (
    ("Mucosal thickening with an air-fluid level in the {side} maxillary sinus.", "{side} maxillary sinusitis."),
))
_C_DISCS: Topic = ("Discs", (
    "No significant disc herniation or spinal canal stenosis.",
), (
    ("At {clevel}, a {side} paracentral disc protrusion causes {sev} spinal canal stenosis.",
     "{clevel} {side} paracentral disc protrusion with {sev} spinal canal stenosis."),
    ("Uncovertebral hypertrophy at {clevel} results in {sev} {side} neural foraminal narrowing.",
     "{sev} {side} neural foraminal narrowing at {clevel}."),
))
_CORD: Topic = ("Cord", (
    "The spinal cord is normal in caliber and signal.",
), (
    ("Focal T2 hyperintense signal is present within the cord at {clevel}.",
     "Cord signal abnormality at {clevel}, which may reflect myelomalacia or edema."),
))
_C_BONES: Topic = ("Alignment and bones", (
    "Alignment is maintained. Vertebral body heights are preserved.",
), (
    ("Nondisplaced fracture through the anterior inferior corner of {cvert}.",
     "Nondisplaced {cvert} teardrop fracture."),
))
_L_DISCS: Topic = ("Discs", (
    "The intervertebral disc heights and signal are preserved without herniation.",
), (
    ("At {llevel}, a broad-based disc bulge and facet hypertrophy cause {sev} spinal canal stenosis.",
     "{sev} spinal canal stenosis at {llevel}."),
    ("At {llevel}, a {side} subarticular disc extrusion contacts the descending nerve root.",
     "{llevel} {side} subarticular disc extrusion contacting the descending nerve root."),
))
_L_BONES: Topic = ("Alignment and bones", (
    "Alignment is normal. Vertebral body heights are maintained.",
), (
    ("A Schmorl node is present along the superior endplate of {lvert}.", "Schmorl node at {lvert}."),
    ("Grade 1 anterolisthesis of L4 on L5 with bilateral pars defects.",
     "Grade 1 L4-L5 spondylolisthesis with bilateral spondylolysis."),
))
_MENISCI: Topic = ("Menisci", (
    "The medial and lateral menisci are intact.",
), (
    ("Oblique tear of the posterior horn of the {meniscus} meniscus extends to the inferior articular surface.",
     "Tear of the posterior horn of the {meniscus} meniscus."),
))
_LIGAMENTS: Topic = ("Ligaments", (
    "The cruciate and collateral ligaments are intact.",
), (
    ("The anterior cruciate ligament is discontinuous with pivot-shift bone contusions.",
     "Complete anterior cruciate ligament tear."),
))
_KNEE_FLUID: Topic = ("Joint", (
    "No joint effusion. Articular cartilage is preserved.",
), (
    ("A {size} cm Baker cyst is present in the popliteal fossa.", "{size} cm Baker cyst."),
    ("Full-thickness cartilage loss in the {compartment} compartment.", "{compartment} compartment chondral loss."),
))
_KNEE_BONES_XR: Topic = ("Bones", (
    "No acute fracture or dislocation.",
), (
    ("Nondisplaced fracture of the lateral tibial plateau.", "Nondisplaced lateral tibial plateau fracture."),
))
_KNEE_JOINT_XR: Topic = ("Joint", (
    "Joint spaces are maintained. No joint effusion.",
), (
    ("Moderate {compartment} compartment joint space narrowing with marginal osteophytes.",
     "Moderate {compartment} compartment osteoarthritis."),
))
_CUFF: Topic = ("Rotator cuff", (
    "The rotator cuff tendons are intact.",
), (
    ("Full-thickness tear of the supraspinatus tendon measuring {size} cm with {mm} mm retraction.",
     "Full-thickness supraspinatus tear measuring {size} cm with {mm} mm retraction."),
))
_LABRUM: Topic = ("Labrum and humeral head", (
    "The glenoid labrum is intact. The humeral head is normal.",
), (
    ("Detachment of the anteroinferior labrum, consistent with a Bankart lesion.", "Bankart lesion."),
    ("Impaction deformity of the posterolateral humeral head, consistent with a Hill-Sachs lesion.",
     "Hill-Sachs lesion."),
))
_AC_JOINT: Topic = ("Acromioclavicular joint", (
    "The acromioclavicular joint is unremarkable.",
), (
    ("Moderate acromioclavicular joint arthropathy with inferior osteophytes.",
     "Moderate acromioclavicular joint arthropathy."),
))
_SHOULDER_XR: Topic = ("Alignment", (
    "The glenohumeral joint is congruent. No fracture.",
), (
    ("The humeral head is displaced anteriorly and inferiorly relative to the glenoid.",
     "Anterior glenohumeral dislocation."),
))
_WRIST: Topic = ("Bones", (
    "No acute fracture. The carpal alignment is normal.",
), (
    ("Transverse distal radial metaphyseal fracture with dorsal angulation, consistent with a Colles fracture.",
     "Colles fracture of the {side} distal radius."),
    ("Nondisplaced fracture through the waist of the scaphoid.", "Nondisplaced scaphoid waist fracture."),
))
_SOFT_TISSUES: Topic = ("Soft tissues", (
    "Soft tissues are unremarkable.",
    "No soft tissue swelling or radiopaque foreign body.",
), ())
_MINERALIZATION: Topic = ("Mineralization", (
    "Bone mineralization is within normal limits.",
), ())
_CALCIUM: Topic = ("Coronary calcium", (
    "There is no coronary artery calcification. The calcium score is 0.",
), (
    ("The total Agatston coronary artery calcium score is {score}.",
     "Coronary artery calcium score of {score}, indicating {burden} plaque burden."),
))
_CORONARIES: Topic = ("Coronary arteries", (
    "The coronary arteries are patent without stenosis.",
), (
    ("Mixed plaque in the proximal {artery} causes {pct} luminal stenosis.",
     "{pct} stenosis of the proximal {artery}; consider functional testing."),
))
_PERICARDIUM: Topic = ("Pericardium", (
    "No pericardial effusion or thickening.",
), ())
_EXTRACARDIAC: Topic = ("Extracardiac", (
    "The included lung fields are clear.",
), (
    ("There is a {size} cm solid nodule in the {lobe}.",
     "Incidental {size} cm {lobe} pulmonary nodule; recommend follow-up CT in {fu}."),
))
_LV: Topic = ("Left ventricle", (
    "Left ventricular size and systolic function are normal.",
), (
    ("The left ventricle is dilated with global hypokinesis and an ejection fraction of {ef}%.",
     "Dilated left ventricle with reduced systolic function, ejection fraction {ef}%."),
))
_LGE: Topic = ("Late gadolinium enhancement", (
    "No late gadolinium enhancement.",
), (
    ("Subendocardial late gadolinium enhancement in the LAD territory involving {pct} wall thickness.",
     "Prior LAD territory infarct, subendocardial ({pct} transmurality)."),
))
_ESOPHAGUS: Topic = ("Esophagus", (
    "The esophagus distends normally with normal primary peristalsis.",
), (
    ("A reticular mucosal pattern is seen in the distal esophagus.",
     "Reticular distal esophageal mucosa, suspicious for Barrett esophagus; endoscopy is recommended."),
    ("A smooth {size} cm stricture narrows the distal esophagus.",
     "Smooth distal esophageal stricture, likely peptic."),
    ("A {size} cm Zenker diverticulum arises posteriorly at the pharyngoesophageal junction.",
     "{size} cm Zenker diverticulum."),
))
_HIATUS: Topic = ("Hiatus", (
    "No hiatal hernia. No gastroesophageal reflux was elicited.",
), (
    ("A small sliding hiatal hernia with spontaneous gastroesophageal reflux.",
     "Small sliding hiatal hernia with gastroesophageal reflux."),
))
_STOMACH: Topic = ("Stomach and duodenum", (
    "The stomach and duodenum are normal in contour and distensibility.",
), (
    ("A {mm} mm ulcer crater is seen along the lesser curvature of the gastric antrum.",
     "{mm} mm lesser curvature gastric ulcer."),
))
_SMALL_BOWEL: Topic = ("Small bowel", (
    "Small bowel loops are normal in caliber and fold pattern.",
), (
    ("Narrowing and nodularity of the terminal ileum with a string sign and separation of loops.",
     "Terminal ileal stricture with string sign, consistent with Crohn disease."),
))
_TRANSIT: Topic = ("Transit", (
    "Contrast reached the colon without delay.",
), ())
_COLON: Topic = ("Colon", (
    "The colon is normal in caliber with a normal mucosal pattern.",
), (
    ("An annular constricting lesion with overhanging edges in the {colon} measures {size} cm.",
     "{size} cm apple-core lesion in the {colon}, concerning for carcinoma."),
    ("Scattered diverticula are present in the sigmoid colon.", "Sigmoid diverticulosis."),
))
_RECTUM: Topic = ("Rectum", (
    "The rectum is normal. No transition zone is seen.",
), (
    ("A transition zone is seen at the rectosigmoid with a narrow distal segment.",
     "Rectosigmoid transition zone, suspicious for Hirschsprung disease."),
))
_BLADDER: Topic = ("Bladder", (
    "The bladder is normal in contour and capacity.",
), ())
_REFLUX: Topic = ("Reflux", (
    "No vesicoureteral reflux.",
), (
    ("Contrast refluxes into the {side} ureter and collecting system without dilatation.",
     "Grade {vur} {side} vesicoureteral reflux."),
))
_URETHRA: Topic = ("Urethra", (
    "The urethra is normal during voiding.",
), ())

# Per region: topics, normal impressions, clinical indications (some carry eponyms).
REGIONS: dict[str, tuple[tuple[Topic, ...], tuple[str, ...], tuple[str, ...]]] = {
    "chest_ct": ((_LUNG_CT, _PLEURA, _MEDIASTINUM, _THORACIC_BONES, _UPPER_ABDOMEN),
                 ("No acute intrathoracic abnormality.", "No acute cardiopulmonary abnormality."),
                 ("cough and weight loss", "history of Hodgkin lymphoma, restaging", "shortness of breath",
                  "lung cancer screening")),
    "chest_cta": ((_PULM_ARTERIES, _LUNG_CT, _PLEURA, _MEDIASTINUM, _THORACIC_BONES),
                  ("No pulmonary embolism. No acute intrathoracic abnormality.",),
                  ("chest pain and tachycardia", "dyspnea, elevated D-dimer", "pleuritic chest pain")),
    "chest_xr": ((_HEART_XR, _LUNG_XR, _PLEURA, _RIBS_XR),
                 ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."),
                 ("cough and fever", "chest pain", "shortness of breath", "fall, left chest wall pain")),
    "abdomen": ((_LIVER, _GALLBLADDER, _SOLID_ORGANS, _KIDNEYS, _BOWEL, _AORTA, _PELVIS),
                ("No acute abdominal or pelvic abnormality.",),
                ("right lower quadrant pain", "Crohn disease with abdominal pain", "flank pain and hematuria",
                 "Wilms tumor status post left nephrectomy in childhood", "Cushing syndrome, adrenal evaluation")),
    "head": ((_BRAIN, _VENTRICLES, _EXTRA_AXIAL, _SINUSES),
             ("No acute intracranial abnormality.",),
             ("headache", "Parkinson disease with fall", "altered mental status, Alzheimer dementia",
              "left-sided weakness")),
    "cspine": ((_C_DISCS, _CORD, _C_BONES),
               ("No acute cervical spine abnormality.", "Unremarkable cervical spine."),
               ("neck pain radiating to the arm", "trauma, neck pain", "hand numbness")),
    "lspine": ((_L_DISCS, _L_BONES),
               ("No significant lumbar spine abnormality.",),
               ("low back pain", "right leg radiculopathy", "back pain after lifting")),
    "knee_mr": ((_MENISCI, _LIGAMENTS, _KNEE_FLUID),
                ("Normal MRI of the knee.",),
                ("twisting injury", "posterior knee swelling", "medial joint line pain")),
    "knee_xr": ((_KNEE_BONES_XR, _KNEE_JOINT_XR, _SOFT_TISSUES),
                ("No acute osseous abnormality of the knee.",),
                ("knee pain", "fall onto the knee")),
    "shoulder_mr": ((_CUFF, _LABRUM, _AC_JOINT),
                    ("Normal MRI of the shoulder.",),
                    ("prior dislocation, instability", "weakness with abduction", "shoulder pain")),
    "shoulder_xr": ((_SHOULDER_XR, _AC_JOINT, _MINERALIZATION, _SOFT_TISSUES),
                    ("No acute osseous abnormality of the shoulder.",),
                    ("fall on outstretched arm", "shoulder pain after trauma")),
    "wrist_xr": ((_WRIST, _MINERALIZATION, _SOFT_TISSUES),
                 ("No acute fracture of the wrist.",),
                 ("fall on outstretched hand", "wrist pain and swelling")),
    "cardiac_ct": ((_CALCIUM, _CORONARIES, _PERICARDIUM, _EXTRACARDIAC),
                   ("No coronary artery disease.",),
                   ("atypical chest pain", "family history of coronary artery disease")),
    "cardiac_mr": ((_LV, _LGE, _PERICARDIUM),
                   ("Normal cardiac MRI.",),
                   ("cardiomyopathy evaluation", "Graves disease with palpitations", "reduced ejection fraction")),
    "ugi": ((_ESOPHAGUS, _HIATUS, _STOMACH),
            ("Normal upper GI examination.",),
            ("dysphagia", "heartburn, evaluate for Barrett esophagus", "epigastric pain")),
    "small_bowel": ((_SMALL_BOWEL, _TRANSIT),
                    ("Normal small bowel follow through.",),
                    ("Crohn disease, evaluate extent", "chronic diarrhea")),
    "colon": ((_COLON, _RECTUM),
              ("Normal barium enema.",),
              ("change in bowel habits", "constipation since infancy", "rectal bleeding")),
    "vcug": ((_BLADDER, _REFLUX, _URETHRA),
             ("Normal voiding cystourethrogram.",),
             ("recurrent urinary tract infections", "prenatal hydronephrosis")),
}

TECHNIQUE = {
    "CT": ("Axial images were obtained with multiplanar reformats. DLP {dlp} mGy-cm.",
           "Helical CT with 2.5 mm axial reconstructions. CTDIvol {ctdi} mGy."),
    "MR": ("Multiplanar multisequence images were obtained at 1.5 T.",
           "Sagittal and axial T1- and T2-weighted images were obtained at 3 T."),
    "XR": ("Frontal and lateral views.", "Three views."),
    "RF": ("Fluoroscopy time {fluoro} minutes.",
           "Single and double contrast technique; fluoroscopy time {fluoro} minutes."),
}

# ---------------------------------------------------------------- slot values
_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe", "lingula")
_SEVERITY = ("small", "moderate", "large")
_C_LEVELS = ("C2-C3", "C3-C4", "C4-C5", "C5-C6", "C6-C7", "C7-T1")
_L_LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
_RIBS = ("third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
_ARTERIES = ("left anterior descending artery", "left circumflex artery", "right coronary artery")
_COLON_SEGMENTS = ("sigmoid colon", "descending colon", "transverse colon", "ascending colon")
Rand = Callable[[], float]


def _pick(r: Rand, options: tuple) -> str:
    return options[int(r() * len(options))]


SLOTS: dict[str, Callable[[Rand], str]] = {
    "side": lambda r: _pick(r, ("right", "left")),
    "lobe": lambda r: _pick(r, _LOBES),
    "size": lambda r: f"{0.4 + int(r() * 26) / 10:.1f}",
    "big": lambda r: f"{3.0 + int(r() * 50) / 10:.1f}",
    "mm": lambda r: str(3 + int(r() * 12)),
    "sev": lambda r: _pick(r, _SEVERITY),
    "seg": lambda r: str(2 + int(r() * 7)),
    "pct": lambda r: f"{20 + 10 * int(r() * 7)}%",
    "tvert": lambda r: f"T{4 + int(r() * 9)}",
    "cvert": lambda r: f"C{2 + int(r() * 6)}",
    "lvert": lambda r: f"L{1 + int(r() * 5)}",
    "clevel": lambda r: _pick(r, _C_LEVELS),
    "llevel": lambda r: _pick(r, _L_LEVELS),
    "rib": lambda r: _pick(r, _RIBS),
    "brainlobe": lambda r: _pick(r, ("frontal", "parietal", "temporal", "occipital")),
    "meniscus": lambda r: _pick(r, ("medial", "lateral")),
    "compartment": lambda r: _pick(r, ("medial", "lateral", "patellofemoral")),
    "score": lambda r: str(1 + int(r() * 800)),
    "artery": lambda r: _pick(r, _ARTERIES),
    "ef": lambda r: str(20 + int(r() * 20)),
    "colon": lambda r: _pick(r, _COLON_SEGMENTS),
    "vur": lambda r: _pick(r, ("I", "II", "III")),
    "dlp": lambda r: str(150 + int(r() * 700)),
    "ctdi": lambda r: f"{4 + int(r() * 150) / 10:.1f}",
    "fluoro": lambda r: f"{0.5 + int(r() * 60) / 10:.1f}",
}
# Slots computed from other slots, so that e.g. the follow-up interval follows from nodule size.
DERIVED: dict[str, Callable[[dict[str, str]], str]] = {
    "fu": lambda v: "12 months" if float(v["size"]) < 0.6 else "6 months" if float(v["size"]) < 1.0 else "3 months",
    "burden": lambda v: "mild" if int(v["score"]) < 100 else "moderate" if int(v["score"]) < 400 else "severe",
}


Abnormal = tuple[str, str, tuple[str, ...], tuple[str, ...]]  # findings, impression, slots, derived slots


def _compile(finding: str, impression: str) -> Abnormal:
    names = dict.fromkeys(name for _, name, _, _ in Formatter().parse(finding + impression) if name)
    return (finding, impression, tuple(n for n in names if n not in DERIVED), tuple(n for n in names if n in DERIVED))


# Templates parsed once: region -> ((label, normal sentences, abnormal findings), ...).
_TOPICS: dict[str, tuple[tuple[str, tuple[str, ...], tuple[Abnormal, ...]], ...]] = {
    region: tuple((label, normals, tuple(_compile(f, i) for f, i in abnormals)) for label, normals, abnormals in topics)
    for region, (topics, _, _) in REGIONS.items()
}
# modality -> ((technique template, its slots), ...)
_TECHNIQUES = {modality: tuple((t, _compile(t, "")[2]) for t in templates) for modality, templates in TECHNIQUE.items()}

# ---------------------------------------------------------------- PHI values
_FIRST = ("John", "Mary", "Robert", "Patricia", "Michael", "Linda", "William", "Elizabeth", "David", "Susan",
          "James", "Jennifer", "Carlos", "Maria", "Wei", "Mei", "Ahmed", "Fatima", "Raj", "Priya", "Olga",
          "Ivan", "Kwame", "Ama", "Hiroshi", "Yuki", "Sean", "Siobhan", "Pierre", "Claire")
_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
         "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Jackson", "Lee", "Nguyen", "Patel", "Kim",
         "O'Connor", "McAllister", "Baker", "Graves", "Parkinson", "Harris", "Schmidt", "Kowalski", "Okafor",
         "Tanaka", "Dubois", "Haddad", "Cohen", "Rossi", "Larsen", "Silva", "Chen", "Murphy", "Walsh", "Novak")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _date(r: Rand, first_year: int, last_year: int) -> tuple[int, int, int]:
    month = 1 + int(r() * 12)
    return first_year + int(r() * (last_year - first_year + 1)), month, 1 + int(r() * _DAYS_IN_MONTH[month - 1])


# One date layout per report, as one reporting system would print it.
_DATE_FORMATS: tuple[Callable[[int, int, int], str], ...] = (
    lambda y, m, d: f"{m:02d}/{d:02d}/{y}",
    lambda y, m, d: f"{m}/{d}/{y}",
    lambda y, m, d: f"{y}-{m:02d}-{d:02d}",
    lambda y, m, d: f"{_MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d:02d}-{_MONTHS[m - 1][:3].upper()}-{y}",
    lambda y, m, d: f"{_MONTHS[m - 1][:3]} {d}, {y}",
)


def _person_name(r: Rand, first: str, last: str) -> str:
    """A patient name in one of the layouts seen in report headers."""
    initial = "ABCDEFGHJKLMNPRSTW"[int(r() * 18)]
    style = int(r() * 5)
    if style == 0:
        return f"{last.upper()}, {first.upper()}"
    if style == 1:
        return f"{first} {initial}. {last}"
    if style == 2:
        return f"{last}, {first} {initial}"
    if style == 3:
        return f"{last.upper()}, {first.upper()} {initial}"
    return f"{first} {last}"


def _phone(r: Rand) -> str:
    area, line = 201 + int(r() * 780), int(r() * 10000)
    return f"({area}) 555-{line:04d}" if r() < 0.5 else f"{area}-555-{line:04d}"


# ---------------------------------------------------------------- report assembly


@dataclass(slots=True)
class SyntheticReport:
    """One generated report plus the ground truth of its sections (None when absent)."""

    id: str
    exam_code: str
    modality: str
    text: str
    findings: str | None
    impression: str | None
    defect: str | None

    def record(self) -> dict[str, str]:
        return {"id": self.id, "exam_code": self.exam_code, "modality": self.modality, "text": self.text}


_SHORT_FINDINGS = ("Normal study.", "See impression.", "Unchanged from prior.", "No acute findings.",
                   "Limited but unremarkable examination.")
_FINDINGS_HEADERS = ("FINDINGS:", "Findings:", "FINDINGS:\n", "Findings\n", "FINDINGS\n")
_IMPRESSION_HEADERS = ("IMPRESSION:", "Impression:", "CONCLUSION:", "IMPRESSION:\n", "Impression\n", "CONCLUSION\n")
_HISTORY_HEADERS = ("CLINICAL HISTORY:", "HISTORY:", "INDICATION:", "Clinical indication:", "REASON FOR EXAM:")
_EXAM_HEADERS = ("EXAM:", "EXAMINATION:", "PROCEDURE:", "Exam:")
_SEXES = ("male", "female", "man", "woman")


def _section(header: str, body: str) -> str:
    return header + body if header.endswith("\n") else f"{header} {body}"


def _findings_and_impression(r: Rand, region: str, side: str | None) -> tuple[str, list[str], bool]:
    """Findings text, impression items, and whether anything abnormal was found."""
    p_abnormal = 0.0 if r() < 0.35 else 0.3
    labelled, one_per_line = r() < 0.25, r() < 0.25
    sentences: list[str] = []
    impressions: list[str] = []
    for label, normals, abnormals in _TOPICS[region]:
        if abnormals and len(impressions) < 3 and r() < p_abnormal:
            finding, impression, slots, derived = _pick(r, abnormals)
            values = {name: SLOTS[name](r) for name in slots}
            if side and "side" in values:  # a lateral exam's findings are on its side
                values["side"] = side
            for name in derived:
                values[name] = DERIVED[name](values)
            sentence = _capitalize(finding.format(**values))
            impressions.append(_capitalize(impression.format(**values)))
        else:
            sentence = _pick(r, normals)
        sentences.append(f"{label}: {sentence}" if labelled else sentence)
    findings = "\n".join(sentences) if labelled or one_per_line else " ".join(sentences)
    if impressions:
        return findings, impressions, True
    return findings, [_pick(r, REGIONS[region][1])], False


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _impression_text(r: Rand, items: list[str]) -> str:
    if len(items) > 1 and r() < 0.7:
        return "\n".join(f"{n}. {item}" for n, item in enumerate(items, 1))
    return " ".join(items)


def _header(r: Rand, fmt_date: Callable[..., str], first: str, last: str, doctor: tuple[str, str],
            dob: tuple[int, int, int], exam_date: tuple[int, int, int], age: int) -> list[str]:
    name = _person_name(r, first, last)
    mrn = f"{int(r() * 10**8):08d}"
    accession = f"{exam_date[0]}{exam_date[1]:02d}{exam_date[2]:02d}{int(r() * 10000):04d}"
    style = int(r() * 3)
    if style == 0:
        lines = [f"Patient: {name}", f"MRN: {mrn}", f"DOB: {fmt_date(*dob)}",
                 f"Accession: {accession}", f"Exam Date: {fmt_date(*exam_date)}"]
    elif style == 1:
        lines = [f"Name: {name}    Medical Record #: {mrn}",
                 f"Date of Birth: {fmt_date(*dob)}    Age: {age}",
                 f"ACC# {accession}    Date of Service: {fmt_date(*exam_date)}"]
    else:
        lines = ["RADIOLOGY REPORT", f"PATIENT NAME: {name}", f"MR#: {mrn}  ACCESSION NO: A{accession[2:]}",
                 f"DOB: {fmt_date(*dob)}  STUDY DATE: {fmt_date(*exam_date)}"]
    if r() < 0.5:
        lines.append(f"Referring Physician: Dr. {doctor[0]} {doctor[1]}")
    else:
        lines.append(f"Ordering: {doctor[1].upper()}, {doctor[0].upper()} MD")
    if r() < 0.3:
        lines.append(f"Phone: {_phone(r)}")
    return lines


def make_report(i: int, seed: int = 0, defect_rate: float = 0.05) -> SyntheticReport:
    """Report number `i` of the run `seed`: a pure function of its arguments."""
    if i < 0 or seed < 0:
        raise ValueError("report index and seed must be non-negative")
    rng = random.Random((seed << 40) + i)
    r = rng.random
    defect = DEFECTS[int(r() * 3)] if r() < defect_rate else None
    code, modality, region, description, side = _pick(r, EXAMS)
    first, last = _pick(r, _FIRST), _pick(r, _LAST)
    doctor = (_pick(r, _FIRST), _pick(r, _LAST))
    exam_date = _date(r, 2008, 2018)
    dob = _date(r, 1920, 2000)
    age = exam_date[0] - dob[0]

    fmt_date = _pick(r, _DATE_FORMATS)
    parts = ["\n".join(_header(r, fmt_date, first, last, doctor, dob, exam_date, age))]
    exam_line = f"{code} - {description}" if r() < 0.4 else description
    parts.append(_section(_pick(r, _EXAM_HEADERS), exam_line))
    indication = _pick(r, REGIONS[region][2])
    if r() < 0.5:
        indication = f"{age}-year-old {_pick(r, _SEXES)} with {indication}."
    else:
        indication = _capitalize(indication) + "."
    parts.append(_section(_pick(r, _HISTORY_HEADERS), indication))
    if r() < 0.5:
        technique, slots = _pick(r, _TECHNIQUES[modality])
        parts.append(_section("TECHNIQUE:", technique.format(**{name: SLOTS[name](r) for name in slots})))
    if r() < 0.5:
        parts.append(_section("COMPARISON:", "None."))
    else:
        prior = _date(r, 2005, exam_date[0] - 1)
        parts.append(_section("COMPARISON:", f"{description.split()[0]} dated {fmt_date(*prior)}."))

    findings, items, abnormal = _findings_and_impression(r, region, side)
    impression = _impression_text(r, items)
    if abnormal and r() < 0.2:
        # Critical-result communication: PHI inside the body of the report.
        other = f"{_pick(r, _FIRST)} {_pick(r, _LAST)}"
        impression += (f"\nFindings were discussed with Dr. {other} by telephone on "
                       f"{fmt_date(*exam_date)} at {int(r() * 24):02d}:{int(r() * 60):02d}.")
    if defect == "short_findings":
        findings = _pick(r, _SHORT_FINDINGS)
    elif defect == "no_findings":
        findings = None
    elif defect == "no_impression":
        impression = None

    if findings and impression and defect is None and len(items) > 1 and r() < 0.05:
        # Combined section: prose, then the numbered summary (the rule sections.py documents).
        impression = "\n".join(f"{n}. {item}" for n, item in enumerate(items, 1))
        parts.append(f"FINDINGS AND IMPRESSION:\n{findings}\n\n{impression}")
    else:
        if findings:
            parts.append(_section(_pick(r, _FINDINGS_HEADERS), findings))
        if impression:
            parts.append(_section(_pick(r, _IMPRESSION_HEADERS), impression))
    signer = f"{doctor[0]} {doctor[1]}" if r() < 0.1 else f"{_pick(r, _FIRST)} {_pick(r, _LAST)}"
    if r() < 0.6:
        parts.append(f"Electronically signed by: {signer}, MD on {fmt_date(*exam_date)}")
    else:
        parts.append(f"Dictated by: {signer}, M.D.")
    separator = "\n\n" if r() < 0.7 else "\n"
    return SyntheticReport(f"syn{seed}-{i:09d}", code, modality, separator.join(parts), findings, impression, defect)


def iter_reports(n: int, seed: int = 0, defect_rate: float = 0.05, start: int = 0) -> Iterator[dict[str, str]]:
    """Yield raw records {id, exam_code, modality, text} for reports start .. start+n-1."""
    for i in range(start, start + n):
        yield make_report(i, seed, defect_rate).record()


# ---------------------------------------------------------------- writing


def write_reports(path: str | Path, n: int, seed: int = 0, fmt: Format | None = None, defect_rate: float = 0.05,
                  chunk: int = 10_000) -> int:
    """Stream `n` reports to `path` (format from `fmt` or the suffix); memory stays flat in `n`."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    if fmt not in ("jsonl", "csv", "parquet"):
        raise ValueError(f"cannot tell the output format of {path.name}: pass fmt='jsonl', 'csv' or 'parquet'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        _write_parquet(path, n, seed, defect_rate, chunk)
        return n
    with path.open("w", encoding="utf-8", newline="") as out:
        if fmt == "jsonl":
            for rec in iter_reports(n, seed, defect_rate):
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(out, fieldnames=FIELDS)
            writer.writeheader()
            for start in range(0, n, chunk):
                writer.writerows(iter_reports(min(chunk, n - start), seed, defect_rate, start))
    return n


def _write_parquet(path: Path, n: int, seed: int, defect_rate: float, chunk: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in FIELDS])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            columns: dict[str, list[str]] = {name: [] for name in FIELDS}
            for rec in iter_reports(min(chunk, n - start), seed, defect_rate, start):
                for name in FIELDS:
                    columns[name].append(rec[name])
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
