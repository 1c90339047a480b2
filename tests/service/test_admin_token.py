import pytest

from service.admin import AdminToken
from service.deps import ApiError


def test_admin_routes_are_off_without_a_token():
    with pytest.raises(ApiError) as e:
        AdminToken("").check("Bearer anything")
    assert e.value.status_code == 404 and "GENREC_ADMIN_TOKEN" in e.value.detail


@pytest.mark.parametrize("header, status", [(None, 401), ("Basic abc", 401), ("Bearer ", 401), ("Bearer wrong", 403)])
def test_a_missing_or_wrong_token_is_refused(header, status):
    with pytest.raises(ApiError) as e:
        AdminToken("s3cret").check(header)
    assert e.value.status_code == status


def test_the_configured_token_passes():
    AdminToken("s3cret").check("Bearer s3cret")
    AdminToken("s3cret").check("bearer  s3cret ")
