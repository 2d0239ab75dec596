"""De-identification of DICOM datasets (PS3.15 E.1 basic profile subset, UIDs re-mapped consistently) and the
salted, non-reversible hash of the series UID reported in a study's metadata."""
from __future__ import annotations

import hashlib
import hmac

from shared.core.study.errors import DEFAULT_SALT

#: Attributes removed (PS3.15 E.1 basic profile "X" actions, subset).
DEID_REMOVE = (
    "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName", "PatientMotherBirthName", "MilitaryRank",
    "BranchOfService", "MedicalRecordLocator", "EthnicGroup", "Occupation", "AdditionalPatientHistory",
    "PatientComments", "PatientAge", "PatientSize", "PatientWeight", "PatientReligiousPreference",
    "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson", "ResponsibleOrganization",
    "MedicalAlerts", "Allergies", "PregnancyStatus", "LastMenstrualDate", "SmokingStatus",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingPhysician",
    "RequestingService", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "RequestAttributesSequence",
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "AdmittingDiagnosesDescription",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "AdmissionID", "IssuerOfPatientID", "PatientInsurancePlanCodeSequence",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "SourceApplicationEntityTitle", "InstanceCreatorUID", "TimezoneOffsetFromUTC",
)
#: Attributes kept but emptied (type-2 attributes of the CT image IOD, PS3.15 "Z").
DEID_EMPTY = ("PatientName", "PatientID", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID",
              "StudyDate", "StudyTime")
#: UID attributes that identify instances (re-mapped); class and transfer syntax UIDs are kept.
_KEEP_UIDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
              "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
              "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID", "PrivateInformationCreatorUID"}


def remap_uid(uid: str, salt) -> str:
    """A UID re-mapped consistently: the same (salt, uid) always gives the same 2.25.<128-bit int> UID."""
    salt_b = salt.encode() if isinstance(salt, str) else bytes(salt)
    digest = hashlib.sha256(b"uid\x00" + salt_b + b"\x00" + str(uid).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def deidentify_dataset(ds, salt=DEFAULT_SALT) -> None:
    """De-identify a pydicom Dataset in place (PS3.15 E.1 basic application confidentiality profile, subset).

    Removes the attributes in DEID_REMOVE, empties DEID_EMPTY, empties every person name (PN) and date/time
    (DA/DT/TM) left anywhere (sequences included), removes private tags and overlay/curve groups (burned-in text
    may live there), re-maps instance UIDs consistently (`remap_uid`: the study/series/frame of reference stay
    shared between the files of one series), and sets PatientIdentityRemoved = YES with the method. Geometry
    (orientation, position, spacing, thickness, rescale), pixel data and class UIDs are kept.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds.remove_private_tags()
    for elem in list(ds):
        if 0x5000 <= elem.tag.group <= 0x50FF or 0x6000 <= elem.tag.group <= 0x60FF:
            del ds[elem.tag]

    def scrub(d) -> None:
        for kw in DEID_REMOVE:
            if kw in d:
                delattr(d, kw)
        for kw in DEID_EMPTY:
            if kw in d:
                d[kw].value = ""
        for elem in list(d):
            if elem.VR == "SQ":
                for item in elem.value or []:
                    scrub(item)
            elif elem.VR == "PN" or elem.VR in ("DA", "DT", "TM"):
                elem.value = ""
            elif elem.VR == "UI" and elem.keyword not in _KEEP_UIDS and elem.value:
                if elem.VM > 1:
                    elem.value = [remap_uid(v, salt) for v in elem.value]
                else:
                    elem.value = remap_uid(str(elem.value), salt)

    scrub(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "SourceApplicationEntityTitle" in meta:
            del meta.SourceApplicationEntityTitle
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "covidseg: PS3.15 E.1 basic profile subset; UIDs re-mapped"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])


def _series_key_hash(uid: str, salt) -> str:
    """HMAC-SHA256 of the series UID keyed by the salt (128 bits, hex): stable, not reversible without it."""
    key = salt.encode() if isinstance(salt, str) else bytes(salt)
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:32]
