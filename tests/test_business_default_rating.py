# Policies as data, end to end: a service nobody rated is reported to the province as
# unrated at once; after the jurisdiction's deadline (natural or working days) the hub
# applies the default rating where the jurisdiction makes the hall responsible, as a record
# of its own, flagged, never over a real vote. The hub's clock jumps the days. The
# jurisdiction's catalogue goes to the device, which records its version in the vote.
import pytest

from hub import business, policy
from test_business_hall import BusinessHall, CallbackSink, find, wait_for

pytestmark = pytest.mark.xdist_group("business_default")

D1, W1 = "D0001", "W01"
DAY = 86400


def open_hall(folder, jurisdiction):
    hall = BusinessHall(folder, [(D1, W1)], jurisdiction=jurisdiction)
    store = hall.store()
    try:
        hall.token = business.add_system(store, "queue")
    finally:
        store.close()
    hall.sink = CallbackSink()
    status, body = hall.http("POST", "/api/v1/windows/%s/staff" % W1,
                             {"staff_no": "30003", "name": "王芳"}, token=hall.token)
    assert status == 200, body
    hall.wait_state(D1, "IDLE")
    return hall


def prompt(hall, body, expect=201):
    body = dict({"window": W1, "callback_url": hall.sink.url, "kind": "ji"}, **body)
    status, answer = hall.http("POST", "/api/v1/prompts", body, token=hall.token)
    assert status == expect, answer
    return answer


def events(hall, event):
    return [e for e in hall.sink.verified(hall.token) if e["event"] == event]


def test_sanmenxia_unrated_becomes_basically_satisfied_after_seven_natural_days(tmp_path):
    hall = open_hall(str(tmp_path), "sanmenxia")
    try:
        prompt(hall, {"case_no": "S-1", "task_code": "T-7", "task_name": "食品经营许可",
                      "ttl": 1})
        unrated = hall.wait_stage("S-1", "ji", "unrated", hall.token)
        assert unrated["default_applied_by"] == "hall"
        assert business.unix(unrated["default_due_at"]) - business.unix(
            unrated["service_at"]) == 7 * DAY
        first = unrated["record"]["vote_id"]
        assert hall.wait_province([first])[first]["rated"] == 0
        hall.wait_state(D1, "IDLE")
        prompt(hall, {"case_no": "S-2", "task_name": "食品经营许可"})
        hall.wait_state(D1, "PROMPT")
        hall.press(D1, 5)
        voted = hall.wait_stage("S-2", "ji", "voted", hall.token)
        # Six days on, nothing yet; past the seventh the hall's default applies.
        hall.clock.jump(6 * DAY)
        hall.wait_province([voted["record"]["vote_id"]])
        assert hall.stage("S-1", "ji", hall.token)["status"] == "unrated"
        hall.clock.jump(DAY + 60)
        stage = hall.wait_stage("S-1", "ji", "default_rated", hall.token)
        assert stage["stars"] == 3 and stage["record"]["made_by"] == "hub:default"
        assert stage["record"]["flags"] == ["default"]
        vote_id = stage["record"]["vote_id"]
        assert vote_id == D1 + ".default:1"
        record = hall.wait_province([vote_id])[vote_id]
        assert record["rated"] == 1 and record["satisfaction"] == "3"
        assert record["projectNo"] == "S-1" and record["taskCode"] == "T-7"
        assert record["taskName"] == "食品经营许可" and record["proManagerNo"] == "30003"
        assert record["deviceNo"] == D1 + ".default"
        # The unrated report stays; the real vote is untouched; one service, one rating.
        assert hall.province_records()[first]["rated"] == 0
        assert hall.stage("S-2", "ji", hall.token)["stars"] == 5
        assert prompt(hall, {"case_no": "S-1"}, expect=409)["status"] == "rated"
        event = wait_for(lambda: events(hall, "default_rated"), 20, "default callback")[0]
        assert event["cases"][0]["case_no"] == "S-1" and event["cases"][0]["stars"] == 3
        assert len(hall.query("SELECT * FROM derived_records WHERE why = 'default'")) == 1
    finally:
        hall.sink.close()
        hall.close()


def test_taian_catalogue_then_reminder_and_default_after_working_days(tmp_path):
    hall = open_hall(str(tmp_path), "shanghai")
    try:
        # Shanghai's catalogue is on the device: a bad rating records its version.
        prompt(hall, {"case_no": "C-1", "task_name": "居住证办理"})
        hall.wait_state(D1, "PROMPT")
        hall.press(D1, 2)
        hall.wait_state(D1, "REASONS")
        # Shanghai's list: 办事流程繁琐 (under the cursor), 办理时间过长, 办事指南不准确 on the
        # first page; the national list has 材料要求不清楚 second.
        assert hall.shows(D1, hall.rendered("办理时间过长"))[1] == 16
        assert not find(hall.screen(D1), hall.rendered("材料要求不清楚"))
        for _ in range(4):
            hall.press(D1, 4)   # 下: to 线上办理不便捷 (Shanghai's own), on the second page
        hall.press(D1, 3)
        hall.press(D1, 1)
        stage = hall.wait_stage("C-1", "ji", "voted", hall.token)
        assert stage["reasons"] == ["I08"] and stage["cv"] == "sh-2019.1"
        assert set(stage["bad_rating"]["deadlines"]) == {"contact", "fix", "complex"}
        hall.wait_state(D1, "IDLE")
        # The hall moves to Tai'an's rules: the hub sends the new catalogue at once.
        store = hall.store()
        try:
            policy.choose(store, "taian")
        finally:
            store.close()
        wait_for(lambda: hall.http("GET", "/api/v1/policy", token=hall.token)[1]
                 ["jurisdiction"] == "taian", 10, "the hub to follow")
        prompt(hall, {"case_no": "C-2", "task_name": "居住证办理"})
        hall.wait_state(D1, "PROMPT")
        hall.press(D1, 2)
        hall.wait_state(D1, "REASONS")
        for _ in range(4):
            hall.press(D1, 4)   # the cursor on S01; 需要多次跑动 (Tai'an only) above it
        assert hall.shows(D1, hall.rendered("需要多次跑动"))
        hall.press(D1, 3)
        hall.press(D1, 1)
        stage = hall.wait_stage("C-2", "ji", "voted", hall.token)
        assert stage["reasons"] == ["S01"] and stage["cv"] == "ta-2020.1"
        assert set(stage["bad_rating"]["deadlines"]) == {"revisit"}
        assert stage["bad_rating"]["appeal_until"] is not None
        records = hall.wait_province([stage["record"]["vote_id"]])
        assert list(records.values())[0]["evalDetail"] == "S01"
        hall.wait_state(D1, "IDLE")
        # Unrated under Tai'an: an SMS reminder after 1 working day, 满意 after 5.
        prompt(hall, {"case_no": "C-3", "task_name": "居住证办理", "ttl": 1})
        unrated = hall.wait_stage("C-3", "ji", "unrated", hall.token)
        taian = policy.load("taian")
        service_t = business.unix(unrated["service_at"])
        assert business.unix(unrated["reminder_due_at"]) == taian.reminder_due(service_t)
        assert business.unix(unrated["default_due_at"]) == taian.default_due(service_t)
        assert not events(hall, "reminder_due")
        hall.clock.jump(taian.reminder_due(service_t) - service_t + 60)
        reminder = wait_for(lambda: events(hall, "reminder_due"), 20, "reminder callback")[0]
        assert reminder["cases"][0]["case_no"] == "C-3"
        assert hall.stage("C-3", "ji", hall.token)["status"] == "unrated"
        hall.clock.jump(taian.default_due(service_t) - taian.reminder_due(service_t))
        stage = hall.wait_stage("C-3", "ji", "default_rated", hall.token)
        assert stage["stars"] == 4
        record = hall.wait_province([stage["record"]["vote_id"]])[stage["record"]["vote_id"]]
        assert record["satisfaction"] == "4" and record["rated"] == 1
        # Voted cases never get a default.
        assert [r["case_id"] for r in hall.query("SELECT case_id FROM derived_records")] == \
            [hall.query("SELECT id FROM cases WHERE case_no = 'C-3'")[0]["id"]]
    finally:
        hall.sink.close()
        hall.close()
