-- title: Users whose last sync failed
-- answers: Which users failed in the last pass that tried them, and why? The next pass
--   continues each from its saved cursor (listing_pages > 0: stopped mid-listing, the pages
--   before are kept); a user that syncs later leaves this list.
-- params: none
SELECT k.chat_service_sid,
       k.user_sid,
       u.identity,
       k.run_id,
       k.last_error,
       k.last_error_at,
       k.attempts,
       k.listing_pages
FROM sync_cursors AS k
JOIN users AS u ON u.chat_service_sid = k.chat_service_sid AND u.user_sid = k.user_sid
WHERE k.state = 'failed'
ORDER BY k.last_error_at DESC NULLS LAST, k.chat_service_sid, k.user_sid;
