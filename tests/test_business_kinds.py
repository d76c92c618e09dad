# A business system drives the hub's API for every kind of counter service, against the real
# hub, the real firmware (its framebuffer says what the citizen saw) and the reference
# province (what was received): 即办件, 承诺件 acceptance (staff only) and delivery, batch
# business, themed business rated overall or per item, bad ratings with reasons, and
# prompts that time out. The hall follows the Xilingol rules: separate item and staff
# indicators, an SMS reminder at once for unrated services, no default rating.
import pytest

import ui_text as T
from hub import bitmaps, business, policy
from test_business_hall import BusinessHall, CallbackSink, find, rows_of_ui, wait_for

pytestmark = pytest.mark.xdist_group("business_kinds")

D1, W1 = "D0001", "W01"


@pytest.fixture(scope="module")
def hall(tmp_path_factory):
    hall = BusinessHall(str(tmp_path_factory.mktemp("kinds")), [(D1, W1)],
                        jurisdiction="xilingol")
    store = hall.store()
    try:
        hall.token = business.add_system(store, "queue")
    finally:
        store.close()
    hall.sink = CallbackSink()
    status, body = hall.http("POST", "/api/v1/windows/%s/staff" % W1,
                             {"staff_no": "10234", "name": "乌日娜"}, token=hall.token)
    assert status == 200 and body["devices"] == [D1], body
    hall.wait_state(D1, "IDLE")
    yield hall
    hall.sink.close()
    hall.close()


def prompt(hall, body, expect=201):
    body = dict({"window": W1, "callback_url": hall.sink.url}, **body)
    status, answer = hall.http("POST", "/api/v1/prompts", body, token=hall.token)
    assert status == expect, answer
    return answer


def rest(hall):
    hall.wait_state(D1, "IDLE", 20)


def outcome_callbacks(hall, case_no):
    return [e for e in hall.sink.verified(hall.token) if e["event"] == "outcome"
            and case_no in [c["case_no"] for c in e["cases"]]]


def test_a_ji_service_shows_item_and_staff_and_its_rating_reaches_the_province(hall):
    rest(hall)
    # The idle screen names who serves, as the hub rendered it.
    assert hall.shows(D1, hall.rendered("乌日娜"))
    answer = prompt(hall, {"case_no": "JI-1", "task_code": "T-11", "task_name": "营业执照变更登记",
                           "dept_code": "11152500MB1234567X", "kind": "ji"})
    assert answer["status"] == "shown" and answer["cases"][0]["status"] == "shown"
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, hall.item("营业执照变更登记")) == (0, 0)
    assert hall.shows(D1, hall.rendered("乌日娜"))
    hall.press(D1, 4)
    stage = hall.wait_stage("JI-1", "ji", "voted", hall.token)
    assert stage["stars"] == 4 and stage["reasons"] == [] and stage["rates"] == ["staff", "item"]
    assert stage["record"]["made_by"] == "device"
    vote_id = stage["record"]["vote_id"]
    record = hall.wait_province([vote_id])[vote_id]
    assert record["projectNo"] == "JI-1" and record["taskCode"] == "T-11"
    assert record["taskName"] == "营业执照变更登记" and record["deptCode"] == "11152500MB1234567X"
    assert record["proManager"] == "乌日娜" and record["proManagerNo"] == "10234"
    assert record["satisfaction"] == "4" and record["rated"] == 1
    # The business system was told, signed with its token.
    event = wait_for(lambda: outcome_callbacks(hall, "JI-1"), 20, "outcome callback")[0]
    assert event["cases"][0]["status"] == "voted" and event["cases"][0]["stars"] == 4


def test_a_long_item_name_scrolls_on_the_device_and_nothing_is_cut(hall):
    rest(hall)
    name = "国有建设用地使用权及房屋所有权首次登记（不动产登记）"
    assert bitmaps.rasterize(name, max_width=1024).cut == 0
    item = hall.item(name)
    assert len(item) == 16 and len(item[0]) > 256   # one line, wider than the screen
    prompt(hall, {"case_no": "LONG-1", "task_name": name, "kind": "ji"})
    hall.wait_state(D1, "PROMPT")
    # It rests at its start, glides left, rests at its end: every column is shown.
    assert hall.shows(D1, [row[:256] for row in item], timeout=20) == (0, 0)
    assert hall.shows(D1, [row[-256:] for row in item], timeout=20) == (0, 0)
    hall.press(D1, 5)
    stage = hall.wait_stage("LONG-1", "ji", "voted", hall.token)
    record = hall.wait_province([stage["record"]["vote_id"]])[stage["record"]["vote_id"]]
    assert record["taskName"] == name


def test_cn_acceptance_rates_only_the_staff_and_delivery_is_a_stage_of_its_own(hall):
    rest(hall)
    prompt(hall, {"case_no": "CN-1", "task_name": "建设工程规划许可", "kind": "cn_acc"})
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, rows_of_ui(T.STAFF_ONLY))
    hall.press(D1, 2)   # 不满意: the reasons list
    hall.wait_state(D1, "REASONS")
    xilingol = policy.load("xilingol")
    staff = [label for c, a, label in xilingol.reasons if a == "staff"]
    items = [label for c, a, label in xilingol.reasons if a == "item"]
    # Only staff indicators are offered; the first is under the cursor (drawn inverted),
    # the next rows show as the hub rendered them.
    assert hall.shows(D1, hall.rendered(staff[1]))
    screen = hall.screen(D1)
    assert not any(find(screen, hall.rendered(label)) for label in items)
    hall.press(D1, 3)   # 选择 the first (服务态度差)
    hall.press(D1, 1)   # 提交
    stage = hall.wait_stage("CN-1", "cn_acc", "voted", hall.token)
    assert stage["stars"] == 2 and stage["reasons"] == ["S01"] and stage["cv"] == "xl-2021.1"
    assert stage["rates"] == ["staff"]
    # The bad rating comes with Xilingol's handling deadlines and the appeal window.
    deadlines = stage["bad_rating"]["deadlines"]
    assert set(deadlines) == {"dispatch", "fix", "review"}
    assert deadlines["dispatch"] < deadlines["fix"] < deadlines["review"]
    assert stage["bad_rating"]["appeal_until"] < stage["bad_rating"]["appeal_review_until"]
    vote_id = stage["record"]["vote_id"]
    record = hall.wait_province([vote_id])[vote_id]
    assert record["satisfaction"] == "2" and record["evalDetail"] == "S01"
    rest(hall)
    # One service, one rating: the acceptance stage is done; delivery is another stage.
    again = prompt(hall, {"case_no": "CN-1", "kind": "cn_acc"}, expect=409)
    assert again["status"] == "rated" and "already rated" in again["error"]
    assert prompt(hall, {"case_no": "CN-1", "kind": "ji"}, expect=409)["status"] == "conflict"
    prompt(hall, {"case_no": "CN-1", "task_name": "建设工程规划许可", "kind": "cn_dlv"})
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, rows_of_ui(T.DELIVERY))
    hall.press(D1, 5)
    stage = hall.wait_stage("CN-1", "cn_dlv", "voted", hall.token)
    assert stage["stars"] == 5 and stage["rates"] == ["staff", "item"]
    assert [s["kind"] for s in hall.case("CN-1", hall.token)["stages"]] == ["cn_acc", "cn_dlv"]
    assert prompt(hall, {"case_no": "CN-1", "kind": "cn_dlv"}, expect=409)["status"] == "rated"


def test_batch_business_one_rating_covers_every_case_of_the_visit(hall):
    rest(hall)
    answer = prompt(hall, {"mode": "batch", "cases": ["B-1", "B-2", "B-3"],
                           "task_code": "T-31", "task_name": "机动车注册登记", "kind": "ji"})
    assert [c["status"] for c in answer["cases"]] == ["shown"] * 3
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, rows_of_ui(T.BATCH_OPEN)) and hall.shows(D1, rows_of_ui(T.BATCH_CLOSE))
    assert hall.shows(D1, hall.item("机动车注册登记")) == (0, 0)
    hall.press(D1, 5)
    stages = [hall.wait_stage(c, "ji", "voted", hall.token) for c in ("B-1", "B-2", "B-3")]
    assert all(s["stars"] == 5 for s in stages)
    made_by = [s["record"]["made_by"] for s in stages]
    assert made_by == ["device", "hub:batch", "hub:batch"]
    ids = [s["record"]["vote_id"] for s in stages]
    assert ids[1].startswith(D1 + ".batch:")
    records = hall.wait_province(ids)
    assert sorted(r["projectNo"] for r in records.values()) == ["B-1", "B-2", "B-3"]
    assert {r["satisfaction"] for r in records.values()} == {"5"}
    assert {r["taskName"] for r in records.values()} == {"机动车注册登记"}
    event = wait_for(lambda: outcome_callbacks(hall, "B-2"), 20, "batch callback")[0]
    assert [c["case_no"] for c in event["cases"]] == ["B-1", "B-2", "B-3"]


def test_themed_business_rated_overall_gives_every_linked_item_the_rating(hall):
    rest(hall)
    items = [{"case_no": "TH-1", "task_code": "Q-1", "task_name": "企业设立登记"},
             {"case_no": "TH-2", "task_code": "Q-2", "task_name": "公章刻制备案"},
             {"case_no": "TH-3", "task_code": "Q-3", "task_name": "发票申领"}]
    prompt(hall, {"mode": "overall", "theme": "开办企业一件事", "cases": items, "kind": "ji"})
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, hall.item("开办企业一件事")) == (0, 0)
    hall.press(D1, 3)
    stages = [hall.wait_stage(i["case_no"], "ji", "voted", hall.token) for i in items]
    assert [s["stars"] for s in stages] == [3, 3, 3]
    records = hall.wait_province([s["record"]["vote_id"] for s in stages])
    by_case = {r["projectNo"]: r for r in records.values()}
    assert {c: r["taskName"] for c, r in by_case.items()} == {
        "TH-1": "企业设立登记", "TH-2": "公章刻制备案", "TH-3": "发票申领"}
    assert by_case["TH-2"]["taskCode"] == "Q-2" and by_case["TH-3"]["satisfaction"] == "3"


def test_themed_business_per_item_shows_each_item_after_the_one_before(hall):
    rest(hall)
    items = [{"case_no": "PI-1", "task_name": "社会保险登记"},
             {"case_no": "PI-2", "task_name": "医疗保险登记"},
             {"case_no": "PI-3", "task_name": "住房公积金登记"}]
    answer = prompt(hall, {"mode": "per_item", "cases": items, "kind": "ji", "ttl": 30})
    assert [c["status"] for c in answer["cases"]] == ["shown", "queued", "queued"]
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, hall.item("社会保险登记")) == (0, 0)
    # While the visit lasts the device is taken.
    busy = prompt(hall, {"case_no": "OTHER-1", "kind": "ji"}, expect=409)
    assert busy["status"] == "busy" and "per-item" in busy["error"]
    hall.press(D1, 5)
    hall.wait_stage("PI-2", "ji", "shown", hall.token, timeout=30)
    hall.wait_state(D1, "PROMPT")
    assert hall.shows(D1, hall.item("医疗保险登记")) == (0, 0)
    hall.press(D1, 1)
    hall.wait_state(D1, "REASONS")
    hall.press(D1, 4)   # 下
    hall.press(D1, 3)   # 选择 the second item indicator
    hall.press(D1, 1)   # 提交
    hall.wait_stage("PI-3", "ji", "shown", hall.token, timeout=30)
    assert hall.shows(D1, hall.item("住房公积金登记")) == (0, 0)
    hall.press(D1, 4)
    stages = [hall.wait_stage(i["case_no"], "ji", "voted", hall.token) for i in items]
    assert [s["stars"] for s in stages] == [5, 1, 4]
    assert stages[1]["reasons"] == ["I02"]
    assert len({s["pid"] for s in stages}) == 3
    records = hall.wait_province([s["record"]["vote_id"] for s in stages])
    assert sorted((r["projectNo"], r["satisfaction"]) for r in records.values()) == [
        ("PI-1", "5"), ("PI-2", "1"), ("PI-3", "4")]


def test_a_prompt_nobody_answers_is_reported_unrated_and_a_reminder_is_due(hall):
    rest(hall)
    prompt(hall, {"case_no": "U-1", "task_name": "户口迁移", "kind": "ji", "ttl": 4})
    assert hall.shows(D1, hall.item("户口迁移")) == (0, 0)
    stage = hall.wait_stage("U-1", "ji", "unrated", hall.token)
    rest(hall)   # nobody pressed: back to the idle screen, no thanks
    assert hall.shows(D1, hall.rendered("乌日娜"))
    assert not find(hall.screen(D1), hall.item("户口迁移"))
    # Xilingol sends the citizen an SMS with a rating link at once; no default rating.
    assert stage["reminder_due_at"] == stage["service_at"]
    assert stage["default_due_at"] is None
    vote_id = stage["record"]["vote_id"]
    record = hall.wait_province([vote_id])[vote_id]
    assert record["rated"] == 0 and record["satisfaction"] == "" and record["projectNo"] == "U-1"
    reminders = wait_for(lambda: [e for e in hall.sink.verified(hall.token)
                                  if e["event"] == "reminder_due"], 20, "reminder callback")
    assert reminders[0]["cases"][0]["case_no"] == "U-1"
    # The citizen came back: an unrated service may be prompted again, and rated.
    rest(hall)
    prompt(hall, {"case_no": "U-1", "task_name": "户口迁移", "kind": "ji"})
    hall.wait_state(D1, "PROMPT")
    hall.press(D1, 5)
    assert hall.wait_stage("U-1", "ji", "voted", hall.token)["stars"] == 5
