-- title: What is in this database
-- answers: Which services (and accounts) convsync holds, with their users, conversations and
--   current memberships; last_seen_at: when convsync last stored a change to the service.
-- params: none
SELECT s.chat_service_sid,
       s.account_sid,
       s.friendly_name,
       (SELECT count(*) FROM users AS u
         WHERE u.chat_service_sid = s.chat_service_sid AND u.removed_at IS NULL) AS users,
       (SELECT count(*) FROM conversations AS c
         WHERE c.chat_service_sid = s.chat_service_sid) AS conversations,
       (SELECT count(*) FROM user_conversations_v AS v
         WHERE v.chat_service_sid = s.chat_service_sid) AS memberships,
       s.last_seen_at
FROM services AS s
ORDER BY s.account_sid, s.chat_service_sid;
